"""Print the installed versions of what graphopt runs on (the first lines of every CI log)."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("torch", "transformers", "kernels", "triton", "trl", "peft", "accelerate", "datasets", "flash-attn")


def main() -> None:
    print(f"python {platform.python_version()} on {platform.machine()}")
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {name:<13} {version}")


if __name__ == "__main__":
    main()

"""What graphopt did to a graph, and :func:`explain` to see it.

Every graph the backend receives gets a :class:`GraphReport`: its code before and after the passes,
each rewrite and each decline (with the reason), and the runtime guards installed. Reports go to
the ``graphopt`` logger (``TORCH_LOGS="+graphopt"``), to ``dump_dir`` when set, and to every
:func:`explain` session that is listening.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("graphopt")

_graph_ids = itertools.count()


@dataclass
class Rewrite:
    name: str  # e.g. "mask_elision"
    rule: str  # which pattern matched, e.g. "sdpa_padding_mask"
    detail: str


@dataclass
class Decline:
    name: str
    reason: str


@dataclass
class GuardRecord:
    name: str
    description: str
    rewrites: list[str]


@dataclass
class GraphReport:
    """One graph's passage through graphopt."""

    graph_id: int
    before: str
    after: str = ""
    rewrites: list[Rewrite] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    guards: list[GuardRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)  # Dynamo's reasons, recorded since the previous graph
    pass_seconds: float = 0.0
    quiet: bool = False  # a report that is never published (the fallback graph's) logs nothing

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)

    @property
    def counts(self) -> collections.Counter:
        """Rewrite name → applications in this graph."""
        return collections.Counter(r.name for r in self.rewrites)

    def rewrite(self, name: str, rule: str, detail: str) -> None:
        self.rewrites.append(Rewrite(name, rule, detail))
        if not self.quiet:
            log.debug("graph %d: %s/%s: %s", self.graph_id, name, rule, detail)

    def decline(self, name: str, reason: str) -> None:
        self.declines.append(Decline(name, reason))
        if not self.quiet:
            log.info("graph %d: %s declined: %s", self.graph_id, name, reason)

    def note(self, text: str) -> None:
        self.notes.append(text)


class Report:
    """The reports of every graph compiled during an :func:`explain` call (or a ``with capture()``).

    Attributes:
        graphs: one :class:`GraphReport` per graph, in compile order.
        counts: rewrite name → number of applications, e.g. ``{"mask_elision": 4}``.
        rule_counts: ``(name, rule)`` → applications.
        declines: ``(name, reason)`` pairs.
        guards: the runtime guards installed.
        graph_breaks: why Dynamo split the compiled code into several graphs (its reasons).
        runtime: dispatch statistics (fast-path and fallback calls, failed guard conditions).
        result: what the explained call returned.
    """

    def __init__(self):
        self.graphs: list[GraphReport] = []
        self.runtime: collections.Counter = collections.Counter()
        self.result = None

    @property
    def counts(self) -> collections.Counter:
        return sum((g.counts for g in self.graphs), collections.Counter())

    @property
    def rule_counts(self) -> collections.Counter:
        return collections.Counter((r.name, r.rule) for g in self.graphs for r in g.rewrites)

    @property
    def declines(self) -> list[tuple[str, str]]:
        return [(d.name, d.reason) for g in self.graphs for d in g.declines]

    @property
    def guards(self) -> list[GuardRecord]:
        return [guard for g in self.graphs for guard in g.guards]

    @property
    def graph_breaks(self) -> list[str]:
        return [reason for g in self.graphs for reason in g.graph_breaks]

    def graph_code(self, which: str = "after") -> list[str]:
        """Readable Python for each graph, ``which`` = ``"before"`` or ``"after"`` the passes."""
        return [getattr(g, which) for g in self.graphs]

    def to_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "rule_counts": {f"{n}/{r}": c for (n, r), c in self.rule_counts.items()},
            "runtime": dict(self.runtime),
            "graphs": [asdict(g) for g in self.graphs],
        }

    def __str__(self) -> str:
        lines = [f"graphopt report: {len(self.graphs)} graph(s)"]
        counts = self.counts
        lines.append(
            "rewrites: " + (", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none")
        )
        for (name, rule), n in sorted(self.rule_counts.items()):
            lines.append(f"  {name}/{rule}: {n}")
        if self.declines:
            lines.append("declined:")
            for (name, reason), n in collections.Counter(self.declines).items():
                lines.append(f"  {name}: {reason}" + (f" (x{n})" if n > 1 else ""))
        if self.graph_breaks:
            lines.append("graph breaks (Dynamo split the code; each graph is rewritten on its own):")
            for reason, n in collections.Counter(self.graph_breaks).items():
                lines.append(f"  {reason}" + (f" (x{n})" if n > 1 else ""))
        if self.guards:
            lines.append("runtime guards:")
            for guard in self.guards:
                lines.append(f"  {guard.name}: {guard.description}")
        if self.runtime:
            lines.append(
                "runtime: " + ", ".join(f"{k}={v}" for k, v in sorted(self.runtime.items()))
            )
            from graphopt.guards import GUARD_ADVICE

            for key in sorted(k for k in self.runtime if k.startswith("failed:")):
                name = key.partition(":")[2]
                lines.append(f"  exact path ran ({name}): {GUARD_ADVICE.get(name, name)}")
        for g in self.graphs:
            for note in g.notes:
                lines.append(f"note (graph {g.graph_id}): {note}")
        lines.append("(graphs before/after: report.graph_code('before'|'after'), or dump_dir=)")
        return "\n".join(lines)

    __repr__ = __str__


_listeners: list[Report] = []
_lock = threading.Lock()


def publish(report: GraphReport, dump_dir: str | None) -> None:
    """Hand a finished graph report to the logger, the listeners and the dump folder."""
    with _lock:
        for listener in _listeners:
            listener.graphs.append(report)
    names = report.counts
    log.info(
        "graph %d: %s; %d decline(s); %d guard(s); passes took %.3fs",
        report.graph_id,
        ", ".join(f"{k} x{v}" for k, v in names.items()) or "no rewrites",
        len(report.declines),
        len(report.guards),
        report.pass_seconds,
    )
    if dump_dir:
        dump(report, dump_dir)


def record_runtime(event: str, n: int = 1) -> None:
    """Count a dispatch event (``fast_path``, ``fallback``, ``failed:<condition>``)."""
    with _lock:
        for listener in _listeners:
            listener.runtime[event] += n


def dump(report: GraphReport, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"graph_{report.graph_id:03d}")
    with open(stem + "_before.py", "w") as f:
        f.write(report.before)
    with open(stem + "_after.py", "w") as f:
        f.write(report.after or report.before)
    with open(stem + "_report.json", "w") as f:
        json.dump(asdict(report) | {"before": None, "after": None}, f, indent=2)
    log.info("graph %d: report written to %s_*", report.graph_id, stem)


def new_graph_report(code: str) -> GraphReport:
    return GraphReport(graph_id=next(_graph_ids), before=code)


def module_code(gm) -> str:
    """The Python code of a GraphModule and of the GraphModules it calls (checkpoint bodies)."""
    parts = [gm.code]
    for name, child in gm.named_children():
        if hasattr(child, "graph") and hasattr(child, "code"):
            parts.append(f"\n# ---- {name} ----{child.code}")
    return "".join(parts)


@contextlib.contextmanager
def capture():
    """Collect the reports of every graph compiled (and every guarded call run) in the block.

    >>> with graphopt.capture() as report:
    ...     loss = compiled_model(**batch).loss
    >>> report.counts["mask_elision"]
    """
    report = Report()
    with _lock:
        _listeners.append(report)
    try:
        yield report
    finally:
        with _lock:
            _listeners.remove(report)


def explain(model_or_fn, *args, options: dict | None = None, mode: str | None = None, **kwargs) -> Report:
    """Compile ``model_or_fn`` with ``backend="graphopt"``, call it once, and report what happened.

    ``model_or_fn`` may be a module, a function, or an already compiled module (its original is
    recompiled). The call's result is in ``report.result``. Dynamo's cache is keyed by code object,
    so this resets Dynamo first: graphs compiled earlier in the process are compiled again on their
    next call.

    Returns:
        a :class:`Report`; ``print(report)`` shows counts, declines and guards,
        ``report.graph_code("before")`` / ``("after")`` the graphs.
    """
    import torch

    target = getattr(model_or_fn, "_orig_mod", model_or_fn)
    torch._dynamo.reset()
    compiled = torch.compile(target, backend="graphopt", mode=mode, options=options)
    start = time.perf_counter()
    with capture() as report:
        report.result = compiled(*args, **kwargs)
    log.info("explain: compiled and ran in %.1fs", time.perf_counter() - start)
    return report

"""Training-step benchmark of eager, inductor and graphopt; see graphopt/bench.py and docs/benchmarks.md."""
import sys

from graphopt.bench import main

sys.exit(main())

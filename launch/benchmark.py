"""`python -m launch.benchmark SUITE [--json] [suite options]`.

Each suite lives in `launch/benchmarks/<suite>.py` (hyphens as underscores) and exposes `main(argv) -> int`; this file only
dispatches, so suites stay independent of one another.
"""
from __future__ import annotations

import importlib
import sys

SUITES = ("models", "step", "data", "kernels", "checkpoint", "text-storage", "teacher_load", "pixart", "pixart-routing",
          "flux", "sample")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(f"usage: python -m launch.benchmark {{{','.join(SUITES)}}} [--json] [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    suite = importlib.import_module(f"launch.benchmarks.{argv[0].replace('-', '_')}")
    return int(suite.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench` (`make bench`): see bench/suite.py and docs/benchmarks.md."""

from __future__ import annotations

import sys

from bench.suite import main

if __name__ == "__main__":
    sys.exit(main())

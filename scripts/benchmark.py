#!/usr/bin/env python
"""Same as ``mim benchmark``: e.g. ``python scripts/benchmark.py --suite cpu``.

Suites, targets and recorded results: docs/benchmarks.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.bench import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Thin wrapper: the benchmark lives in the package (``vitok bench``, ``python -m vitok.bench``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitok.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

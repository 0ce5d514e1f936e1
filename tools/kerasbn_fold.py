#!/usr/bin/env python
"""Thin wrapper: `python tools/kerasbn_fold.py ...` is `kerasbn-fold ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kerasbn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

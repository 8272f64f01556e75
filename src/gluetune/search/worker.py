"""A worker process of `gluetune search` (started by search.study.run_search): `python -m
gluetune.search.worker <search_dir> <index> [<seed>]` runs trials of the study in <search_dir> until
its budget is spent, sampling with `seed` (default: the search's seed + index)."""

from __future__ import annotations

import sys

from ..console import setup_logging
from .study import worker_main

if __name__ == "__main__":
    setup_logging()
    sys.exit(worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None))

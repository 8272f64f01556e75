"""What gluetune prints: its log lines, progress bars in a terminal, aligned metric lines.

In a terminal a loop gets a tqdm bar; in a log file (not a terminal) no bars, only lines. Every
command logs through the `gluetune` logger with one format, and keeps the libraries' own chatter
(transformers' and datasets' logging and bars) out of the user's way.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger("gluetune")

BAR_MIN_BATCHES = 5  # fewer batches than this get no bar: it would only flicker


def setup_logging(speaks: bool = True) -> None:
    """`[gluetune] message` lines on stderr; `speaks=False` (a process other than a multi-process
    run's main one) reports errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[gluetune] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if speaks else logging.ERROR)
    logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library deprecation chatter (transformers v5 renames, pyarrow options) is not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def quiet_libraries() -> None:
    """transformers' and datasets' own logging and weight-loading bars off (gluetune shows progress)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def interactive() -> bool:
    """True when progress bars make sense: stderr is a terminal."""
    return sys.stderr.isatty()


def bar(iterable=None, total: int | None = None, desc: str = "", leave: bool = False, unit: str = "it"):
    """A tqdm bar on stderr in a terminal, none elsewhere (the iterable passes through)."""
    from tqdm.auto import tqdm

    show = interactive() and (total is None or total >= BAR_MIN_BATCHES)
    return tqdm(iterable, total=total, desc=desc, leave=leave, unit=unit, disable=not show, dynamic_ncols=True,
                file=sys.stderr)


def metrics_line(label: str, metrics: dict[str, float], names: list[str]) -> str:
    """`label | loss 0.5123 | matthews_correlation 0.3412 | ...`: fixed-width values, so the lines
    of successive epochs line up."""
    cells = [label] + [f"{name} {metrics[name]:.4f}" for name in names if isinstance(metrics.get(name), (int, float))]
    return " | ".join(cells)

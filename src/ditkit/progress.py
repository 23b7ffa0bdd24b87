"""Progress bars for long commands: drawn in place on a terminal, a line every few seconds in a pipe,
so sampling, evaluation and training always show progress with an ETA."""

from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["progress_bar"]


def progress_bar(total: Optional[int], desc: str) -> Any:
    """A tqdm bar on stderr (``total`` None: a counter). On a terminal it redraws in place; in a pipe
    it writes a line at most every 5 s. A terminal that reports width 0 gets 100 columns."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    width = 0
    if tty:
        import os

        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            width = 0
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=0.2 if tty else 5.0,
                ncols=None if width > 0 else 100, dynamic_ncols=width > 0, leave=False)

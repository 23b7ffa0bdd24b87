"""Progress bars for long commands: drawn in place on a terminal, a line every few seconds in a pipe,
so sampling, evaluation and training always show progress with an ETA.

The pipelines take ``progress``: a callable called with the units of work done (``progress(1)``
per network call and batch). A callable that also has ``set_total(n)`` is told the run's total
before the work starts (``announce_total``): the pipeline that checks a request is the one place
that counts its network calls (SDEdit cuts, RePaint jumps, frames, windows), so neither the CLI nor
the server computes it a second time (``sampling_progress``, the server's ``Job``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

__all__ = ["progress_bar", "sampling_progress", "announce_total", "BarProgress"]


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


def announce_total(progress: Any, total: int) -> None:
    """Tell ``progress`` the number of units the run will report, if it takes one (``set_total``)."""
    set_total = getattr(progress, "set_total", None)
    if set_total is not None:
        set_total(int(total))


class BarProgress:
    """A pipeline ``progress`` callback drawing a tqdm bar whose total the pipeline announces."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, k: int = 1) -> None:
        self.bar.update(k)

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()


@contextlib.contextmanager
def sampling_progress(desc: str = "sampling") -> Iterator[BarProgress]:
    """``with sampling_progress() as progress: pipe(..., progress=progress)``: a bar over the network
    calls of the run, sized by the pipeline (``announce_total``)."""
    with progress_bar(None, desc) as bar:
        yield BarProgress(bar)

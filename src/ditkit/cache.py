"""Where ditkit keeps what it computes once and reuses across runs.

``cache_dir(kind)`` is ``$DITKIT_CACHE_DIR/<kind>`` when that variable is set, else
``~/.cache/ditkit/<kind>``. Kinds in use:

* ``eval``: the feature classifier and reference statistics of ``ditkit eval`` and of periodic
  evaluation, keyed by a hash of the data and of the extractor (so every run on the same data
  shares one classifier);
* ``latents``: VAE latents of a dataset (``--vae``), keyed by data, VAE, image size and flips;
* ``captions``: a frozen text encoder's states per unique caption (``--text-encoder``), keyed by the
  encoder's weights and the maximum caption length (``ditkit.data.captions``).

Everything in it can be deleted at any time; it is rebuilt on the next use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "DITKIT_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """``$DITKIT_CACHE_DIR/<kind>`` or ``~/.cache/ditkit/<kind>`` (not created here)."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ditkit"
    return base / kind

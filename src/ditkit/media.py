"""Writing what ditkit makes: images as uint8 arrays, grids and PNG files with metadata.

Shared by the pipelines, the CLI, the training loop's sample grids and the server (no torch model
code here). Images come in as ``(N, C, H, W)`` float tensors in ``[-1, 1]``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import IO, Optional

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ditkit.fileio import atomic_path

__all__ = ["to_uint8", "to_pil", "make_grid", "display_scale", "save_png"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 (the ADM ``arr_0`` layout)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N PIL images (mode ``L`` for one channel, ``RGB`` for three)."""
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in to_uint8(images)]


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (H', W', C) uint8 picture, ``nrow`` images per row (default
    ~sqrt(N)), ``padding`` pixels of black between them, each image enlarged ``scale`` times
    (nearest neighbour, so tiny images stay sharp)."""
    pixels = to_uint8(images)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def display_scale(image_size: int, target: int = 64) -> int:
    """Integer enlargement that shows an ``image_size`` picture at least ``target`` pixels wide."""
    return max(1, math.ceil(target / image_size))


def heat_rgb(heat: torch.Tensor) -> torch.Tensor:
    """A heat map ``(..., H, W)`` in [0, 1] as colours ``(..., H, W, 3)`` in [0, 1]: red where
    attended (1), blue where not (0), as ditkit's attention-map PNGs draw them."""
    return torch.stack([heat, heat * 0.3, 1 - heat], dim=-1)


def save_png(pixels: np.ndarray, path: str | Path | IO[bytes], metadata: Optional[dict[str, str]] = None) -> None:
    """Save (H, W, C) uint8 (C = 1 or 3) as PNG with ``metadata`` as tEXt chunks (``path`` may
    also be a binary file object, e.g. ``io.BytesIO``). A path is written whole or not at all
    (``ditkit.fileio.atomic_path``); its parent folder is created."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if not isinstance(path, (str, os.PathLike)):
        image.save(path, format="PNG", pnginfo=info)
        return
    with atomic_path(path) as tmp:  # a crash never leaves half a PNG under the final name
        image.save(tmp, format="PNG", pnginfo=info)

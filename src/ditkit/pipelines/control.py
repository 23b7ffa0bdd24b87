"""Sampling-time control for image pipelines: the user's image and mask turned into what the
samplers' inpainting and image-to-image wrappers take (``ditkit.samplers.inpaint``).

* ``load_image(image, size, channels)``: a path, PIL image, list of them, or a tensor -> ``(N, C,
  S, S)`` in [-1, 1]. Alpha is dropped (said once); a wrong number of channels is converted (gray
  <-> RGB, said once); another size is centre-cropped and resized (said once) unless ``strict``.
* ``load_mask(mask, size)``: white (1) = regenerate, black (0) = keep; ``(N, 1, S, S)`` in [0, 1];
  resized with nearest neighbour (said once) unless ``strict``. Non-binary masks are thresholded
  at 0.5 later by ``prepare_mask`` (its note is shown to the user).
* ``outpaint_canvas(image, extend)``: outpainting as inpainting: the image shrunk into the model's
  canvas leaving ``extend`` pixels (``left=16,top=8``) to generate, and the mask of that border.

Errors are one-line ``ConfigError``s naming the flag (``--init-image``, ``--mask``, ``--extend``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ditkit.config import ConfigError

__all__ = ["ImageLike", "load_image", "load_mask", "parse_extend", "outpaint_canvas"]

ImageLike = Union[str, Path, Image.Image, torch.Tensor, np.ndarray, Sequence[Any]]


def _open(item: Any, flag: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        im = Image.open(path)
        im.load()
    except Exception as err:  # Pillow raises several types for corrupt files
        raise ConfigError(f"{flag} {path}: not a readable image ({type(err).__name__}: {err})") from None
    return im


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_image(image: ImageLike, size: int, channels: int, *, strict: bool = False, flag: str = "--init-image") -> torch.Tensor:
    """The user's image(s) as ``(N, channels, size, size)`` float32 in [-1, 1] (see module doc).
    A tensor is taken as ``(C, H, W)`` or ``(N, C, H, W)`` already in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        x = image.float()[None] if image.dim() == 3 else image.float()
        if x.dim() != 4 or x.shape[-1] != size or x.shape[-2] != size:
            raise ConfigError(f"{flag}: a tensor image must be (N, C, {size}, {size}) in [-1, 1], got {tuple(image.shape)}")
        return _match_channels(x, channels, strict, flag)
    from ditkit.data.images import image_to_array  # every bit depth scaled by its range

    out, notes = [], set()
    for item in _items(image):
        im = _open(item, flag)
        if im.size != (size, size):
            if strict:
                raise ConfigError(f"{flag}: the image is {im.width}x{im.height}, the model draws {size}x{size} (drop --strict to resize)")
            notes.add(f"{flag}: resized {im.width}x{im.height} to the model's {size}x{size} (centre crop)")
        pixels, gray, alpha = image_to_array(im, size, str(getattr(item, "name", item)) if not isinstance(item, Image.Image) else flag)
        if alpha:
            notes.add(f"{flag}: the alpha channel was dropped (transparent pixels keep their stored colour)")
        x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1)
        out.append(x[None] if x.dim() == 2 else x.permute(2, 0, 1))
    for note in sorted(notes):
        warnings.warn(note, stacklevel=2)
    return _match_channels(torch.stack(out), channels, strict, flag)


def _match_channels(x: torch.Tensor, channels: int, strict: bool, flag: str) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if strict or x.shape[1] not in (1, 3):
        raise ConfigError(f"{flag}: the image has {x.shape[1]} channels, the model {channels} (gray 1 or RGB 3)")
    warnings.warn(f"{flag}: converted {x.shape[1]}-channel image to the model's {channels} channels", stacklevel=3)
    return x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1).clone()


def load_mask(mask: ImageLike, size: int, *, strict: bool = False, flag: str = "--mask") -> torch.Tensor:
    """``(N, 1, size, size)`` float in [0, 1]: white = regenerate. A tensor is ``(H, W)``,
    ``(1, H, W)`` or ``(N, 1, H, W)`` in [0, 1]."""
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        while m.dim() < 4:
            m = m[None]
    else:
        out = []
        for item in _items(mask):
            im = _open(item, flag)
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(arr)[None, None])
        if len({tuple(m.shape) for m in out}) > 1:
            raise ConfigError(f"{flag}: the masks differ in size; give masks of one size")
        m = torch.cat(out)
    if m.shape[-2:] != (size, size):
        if strict:
            raise ConfigError(f"{flag}: the mask is {m.shape[-1]}x{m.shape[-2]}, the model draws {size}x{size} (drop --strict to resize)")
        warnings.warn(f"{flag}: resized the {m.shape[-1]}x{m.shape[-2]} mask to {size}x{size} (nearest)", stacklevel=2)
        m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")
    return m


def parse_extend(spec: str) -> dict[str, int]:
    """``"left=16,top=8"`` -> ``{"left": 16, "top": 8}`` (sides: left, right, top, bottom)."""
    sides: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("left", "right", "top", "bottom") or not value.strip().isdigit():
            raise ConfigError(f"--extend {spec!r}: write side=pixels, e.g. left=16,top=8 (sides: left, right, top, bottom)")
        sides[key] = int(value)
    return sides


def outpaint_canvas(image: torch.Tensor, extend: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Outpainting in the model's fixed canvas: ``image`` ``(N, C, S, S)`` shrunk into the area
    that ``extend`` leaves, the rest to generate. Returns ``(canvas, mask)`` with mask 1 on the
    border. Raises ``ConfigError`` when the border leaves no room for the image."""
    n, c, s, _ = image.shape
    left, right, top, bottom = (extend.get(k, 0) for k in ("left", "right", "top", "bottom"))
    w, h = s - left - right, s - top - bottom
    if w < 1 or h < 1:
        raise ConfigError(f"--extend leaves {w}x{h} pixels of a {s}x{s} canvas for the image: extend less")
    inner = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    canvas = torch.zeros_like(image)
    mask = torch.ones(n, 1, s, s)
    canvas[:, :, top:top + h, left:left + w] = inner
    mask[:, :, top:top + h, left:left + w] = 0
    return canvas, mask

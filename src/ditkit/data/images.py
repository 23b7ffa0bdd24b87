"""Images from disk: an image folder or a ``.npz`` / ``.npy`` array file, held in memory.

Everything here ends as an ``ImageDataset``: a uint8 tensor ``(N, C, H, W)`` (values 0..255, scaled
to [-1, 1] only per batch, see ``ditkit.data.sampler``) and optional int64 labels ``(N,)``.
Centre crop and resize happen once, at load time.

Value ranges (issue 14.2): every input is scaled from its *true* range to 0..255, never clipped.

- Image files, by Pillow mode: 8-bit ``1``/``L``/``P``/``LA``/``RGB``/``RGBA``/``CMYK``/... through
  Pillow's own conversion to ``L`` or ``RGB``; 16-bit gray ``I;16``/``I;16B``/``I;16L`` by 65535;
  ``I`` (32-bit integer) by 65535 when Pillow widened a 16-bit PNG/PGM into it, by the TIFF's
  ``BitsPerSample`` (unsigned) or ``2**31 - 1`` otherwise (negative values are an error); ``F``
  (float) detected as [0, 1] or, with negative values, [-1, 1] (anything else is an error).
  16-bit RGB(A) PNGs arrive from Pillow as 8-bit ``RGB``/``RGBA`` (the high byte: 32768 -> 128).
  High-bit images are cropped and resized in float before the one rounding to 8 bits.
- Arrays (``.npy``/``.npz``, see ``array_to_uint8_nchw``): uint8 as is, uint16 scaled by 65535,
  floats in [0, 1] or [-1, 1] (detected, or declared by ``data.array_range`` "0,1" / "-1,1");
  any other dtype is a one-line ``DataError`` naming it and this rule.

Lossy conversions are warned once per kind and load, with a count: alpha channels that were not
fully opaque (dropped), and images enlarged more than ``MAX_UPSCALE`` times (e.g. 1x1 to 16x16).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ditkit.errors import ConfigError

__all__ = [
    "DataError",
    "ImageDataset",
    "IMAGE_EXTENSIONS",
    "load_image_folder",
    "load_array_file",
    "center_crop_resize",
    "convert_channels",
    "array_to_uint8_nchw",
    "ARRAY_RANGES",
    "MAX_UPSCALE",
    "image_to_array",
    "LossyConversions",
    "parse_array_range",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ARRAY_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}  # data.array_range values -> (low, high)
MAX_UPSCALE = 4  # enlarging an image more than this many times is warned as lossy
_ARRAY_RULE = (
    "images in .npy/.npz must be uint8 (0..255), uint16 (0..65535) or float in [0, 1] or [-1, 1] "
    "(data.array_range '0,1' or '-1,1' declares which)"
)
_FLOAT_TOLERANCE = 1e-3  # float rounding just outside [0, 1] / [-1, 1] is not a different range


class DataError(ConfigError):
    """The data cannot be used as given; the message names the path and what to change."""


@dataclass
class ImageDataset:
    """Images in memory.

    images: (N, C, H, W) uint8, 0..255. labels: (N,) int64 in [0, num_classes) or None
    (unconditional, num_classes = 0). ``source`` says where the images came from.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    num_classes: int
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


# ---- pixel operations on whole tensors ---------------------------------------------------------


def center_crop_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8: centre crop to a square, then resize
    (antialiased bicubic when shrinking, bilinear when enlarging)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side == size:
        return images.contiguous()
    x = images.float()
    if side > size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) uint8 with C in {1, 3} -> (N, channels, H, W). RGB to gray uses ITU-R 601 luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * luma).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def parse_array_range(array_range: Optional[str]) -> Optional[tuple[float, float]]:
    """``data.array_range`` ("0,1", "-1,1" or None to detect) -> ``(low, high)`` or None."""
    if array_range is None:
        return None
    key = array_range.replace(" ", "")
    if key not in ARRAY_RANGES:
        raise ConfigError(
            f"data.array_range {array_range!r}: use '0,1' or '-1,1', or leave it unset to detect the range"
        )
    return ARRAY_RANGES[key]


def _float_range(
    a: np.ndarray, where: str, array_range: Optional[str] = None, rule: str = _ARRAY_RULE
) -> tuple[float, float]:
    """The range ``(low, high)`` that float images ``a`` are in: declared, or detected from min/max
    (a negative value means [-1, 1]). ``DataError`` naming the range found and ``rule`` otherwise."""
    declared = parse_array_range(array_range)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: float images hold NaN or infinite values: {rule}")
    lo, hi = float(a.min()), float(a.max())
    span = f"float images span [{lo:.4g}, {hi:.4g}]"
    if declared is not None:
        if lo < declared[0] - _FLOAT_TOLERANCE or hi > declared[1] + _FLOAT_TOLERANCE:
            raise DataError(f"{where}: {span}, outside data.array_range {array_range}: {rule}")
        return declared
    if lo >= -_FLOAT_TOLERANCE and hi <= 1 + _FLOAT_TOLERANCE:
        return (0.0, 1.0)
    if lo >= -1 - _FLOAT_TOLERANCE and hi <= 1 + _FLOAT_TOLERANCE:
        return (-1.0, 1.0)
    raise DataError(f"{where}: {span}, neither [0, 1] nor [-1, 1]: {rule}")


def _unit_to_uint8(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (float) -> uint8 0..255, rounded; the clip only removes float rounding."""
    return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def array_to_uint8_nchw(
    array: np.ndarray,
    where: str,
    *,
    array_range: Optional[str] = None,
    lossy: Optional[LossyConversions] = None,
) -> torch.Tensor:
    """Images in an array -> ``(N, C, H, W)`` uint8 with C in {1, 3}.

    Layouts: ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 3, 4} (a fourth
    channel is alpha: dropped, counted in ``lossy`` when not fully opaque). Values, by dtype:
    uint8 as is; uint16 scaled by 65535; float16/32/64 in [0, 1] or [-1, 1], detected from the
    values (a negative value means [-1, 1]) or declared by ``array_range`` ("0,1" / "-1,1", the
    ``data.array_range`` config value). Raises ``DataError`` naming the dtype (or the range found)
    and this rule for anything else, e.g. int64 or floats in 0..255.
    """
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            a = a.transpose(0, 3, 1, 2)  # NHWC (the ADM / numpy convention) -> NCHW
    else:
        raise DataError(f"{where}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W), got {a.shape}")
    if a.shape[1] not in (1, 3, 4):
        raise DataError(f"{where}: images need 1 or 3 channels (4 with alpha), got shape {array.shape}")
    if a.dtype == np.uint8:
        pixels = a
    elif a.dtype == np.uint16:
        pixels = _unit_to_uint8(a.astype(np.float32) / 65535.0)
    elif np.issubdtype(a.dtype, np.floating):
        low, high = _float_range(a, where, array_range)
        pixels = _unit_to_uint8((a.astype(np.float32) - low) / (high - low))
    else:
        raise DataError(f"{where}: array dtype {a.dtype} is not an image type: {_ARRAY_RULE}")
    if pixels.shape[1] == 4:
        if lossy is not None:
            lossy.alpha_dropped += int((pixels[:, 3].reshape(len(pixels), -1).min(1) < 255).sum())
        pixels = pixels[:, :3]
    return torch.from_numpy(np.ascontiguousarray(pixels))


class LossyConversions:
    """Counts lossy conversions during one load; ``warn()`` then warns once per kind with the count.

    Kinds: ``alpha_dropped`` (images whose alpha was not fully opaque; their transparent pixels keep
    their stored colour) and ``upscaled`` (images enlarged more than ``MAX_UPSCALE`` times).
    """

    def __init__(self, source: str, image_size: int) -> None:
        self.source, self.image_size = source, image_size
        self.alpha_dropped = 0
        self.upscaled = 0
        self.smallest_side: Optional[int] = None

    def note_size(self, side: int, count: int = 1) -> None:
        """``count`` images whose square crop has ``side`` pixels are resized to ``image_size``."""
        if side * MAX_UPSCALE < self.image_size:
            self.upscaled += count
            self.smallest_side = side if self.smallest_side is None else min(self.smallest_side, side)

    def warn(self, stacklevel: int = 3) -> None:
        if self.alpha_dropped:
            warnings.warn(
                f"{self.source}: dropped the alpha channel of {self.alpha_dropped} image(s) with transparent "
                "pixels (they keep their stored colour); composite them onto a background first to choose it",
                stacklevel=stacklevel,
            )
        if self.upscaled:
            s, n = self.smallest_side, self.image_size
            warnings.warn(
                f"{self.source}: enlarged {self.upscaled} image(s) more than {MAX_UPSCALE}x (smallest {s}x{s} -> "
                f"{n}x{n}); they hold little detail: use larger images or a smaller --image-size",
                stacklevel=stacklevel,
            )


# ---- single images -------------------------------------------------------------------------------

_GRAY_8BIT_MODES = ("1", "L", "LA", "La")


def _has_transparency(im: Image.Image) -> bool:
    """True when ``im`` has an alpha channel or a transparent colour that is not fully opaque."""
    if "A" in im.mode or "a" in im.mode:
        return im.getchannel("A" if "A" in im.mode else "a").getextrema()[0] < 255
    if "transparency" in im.info:
        return im.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def _high_bit_unit(im: Image.Image, where: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image -> ``(H, W)`` float32 in [0, 1] (module docstring)."""
    pixels = np.asarray(im)
    if im.mode.startswith("I;16"):
        return pixels.astype(np.float32) / 65535.0
    if im.mode == "I":
        top = 2.0**31 - 1
        tags = getattr(im, "tag_v2", None)
        if im.format in ("PNG", "PPM"):
            top = 65535.0  # Pillow widens 16-bit PNG / PGM samples to I (PGM already rescaled to 65535)
        elif tags is not None and 258 in tags:  # TIFF BitsPerSample; SampleFormat 1 = unsigned
            bits = int(np.atleast_1d(tags[258])[0])
            if bits <= 16 or tags.get(339, 1) in (1, (1,)):
                top = 2.0**bits - 1
        if pixels.min() < 0:
            raise DataError(
                f"{where}: 32-bit integer image has negative values ({pixels.min()}); store it as 0..{top:.0f}"
            )
        return (pixels.astype(np.float64) / top).astype(np.float32)
    if im.mode == "F":
        rule = "a float (mode F) image must hold values in [0, 1] or [-1, 1]; rescale it or save it as 16-bit"
        low, high = _float_range(pixels, where, rule=rule)
        return (pixels.astype(np.float32) - low) / (high - low)
    raise DataError(f"{where}: Pillow mode {im.mode} is not supported: convert the image to 8 or 16 bits")


def image_to_array(im: Image.Image, image_size: int, where: str = "image") -> tuple[np.ndarray, bool, bool]:
    """One Pillow image -> ``(pixels, gray, alpha_dropped)``: ``pixels`` uint8 ``(S, S)`` (gray) or
    ``(S, S, 3)``, centre-cropped to a square and resized to ``S = image_size`` (bicubic).

    8-bit modes go through Pillow's ``convert("L" / "RGB")`` (palette, CMYK, 1-bit, alpha
    dropped); 16-bit, 32-bit integer and float modes are scaled from their true range to [0, 1]
    and resized in float, then rounded once (module docstring). Raises ``DataError`` for a value
    range that cannot be read (negative integers, floats outside [-1, 1]).
    """
    alpha_dropped = _has_transparency(im)
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    box = (left, top, left + side, top + side)
    if im.mode.startswith("I") or im.mode == "F":
        crop = Image.fromarray(_high_bit_unit(im, where)).crop(box)  # mode F
        if side != image_size:
            crop = crop.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return _unit_to_uint8(np.asarray(crop)), True, alpha_dropped
    gray = im.mode in _GRAY_8BIT_MODES
    im = im.convert("L" if gray else "RGB").crop(box)
    if side != image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8), gray, alpha_dropped


# ---- image folders -------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_image_folder(root: str | Path, image_size: int, channels: Optional[int] = None) -> ImageDataset:
    """Load every image under ``root``.

    One subfolder per class gives labels (classes sorted by folder name); a flat folder gives an
    unconditional dataset. Unreadable files are skipped with one warning that counts them and
    names a few; a folder without any readable image raises ``DataError``. ``channels`` None keeps
    grayscale if every image is grayscale, else RGB. Every Pillow mode and bit depth is scaled from
    its true range (module docstring, ``image_to_array``); a file whose values have no known range
    raises ``DataError``. Dropped alpha and more than 4x enlargement are warned once each, counted.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: check --data")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d))
    if class_dirs:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            warnings.warn(
                f"{root}: {len(loose)} image(s) directly in the folder are ignored because it has class "
                f"subfolders ({', '.join(d.name for d in class_dirs[:5])}); move them into a class folder",
                stacklevel=2,
            )
        items = [(p, label) for label, d in enumerate(class_dirs) for p in _image_files(d)]
        class_names = [d.name for d in class_dirs]
    else:
        items = [(p, -1) for p in _image_files(root)]
        class_names = []
    if not items:
        raise DataError(
            f"no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}): point --data at a folder "
            "of images, or at a folder with one subfolder of images per class"
        )

    pictures: list[torch.Tensor] = []
    labels: list[int] = []
    skipped: list[Path] = []
    lossy = LossyConversions(str(root), image_size)
    all_gray = True
    for path, label in items:
        try:
            with Image.open(path) as im:
                im.load()
                pixels, gray, alpha_dropped = image_to_array(im, image_size, str(path))
                lossy.note_size(min(im.size))
        except DataError:  # readable, but its values have no known range: say so, do not skip
            raise
        except Exception:  # PIL raises many types for truncated / corrupt / non-image files
            skipped.append(path)
            continue
        lossy.alpha_dropped += alpha_dropped
        all_gray &= gray
        t = torch.from_numpy(pixels.copy())
        pictures.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1))
        labels.append(label)

    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) under {root}: {names}{more}", stacklevel=2)
    if not pictures:
        raise DataError(f"none of the {len(items)} image file(s) under {root} could be read: check the files")
    lossy.warn()

    target = channels if channels is not None else (1 if all_gray else 3)
    images = torch.stack([convert_channels(p[None], target)[0] for p in pictures])
    if class_dirs:
        present = sorted(set(labels))
        if len(present) < len(class_names):
            # A class folder whose files were all unreadable: keep the numbering, say so.
            warnings.warn(f"{root}: some class folders have no readable image", stacklevel=2)
        return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), len(class_names), class_names, str(root))
    return ImageDataset(images, None, 0, [], str(root))


# ---- array files ---------------------------------------------------------------------------------

_IMAGE_KEYS = ("images", "arr_0", "x", "X", "data")
_LABEL_KEYS = ("labels", "arr_1", "y", "Y", "targets")


def load_array_file(
    path: str | Path, image_size: int, channels: Optional[int] = None, *, array_range: Optional[str] = None
) -> ImageDataset:
    """Load a ``.npy`` (images only) or ``.npz`` (images under ``images``/``arr_0``/``x``, optional
    labels under ``labels``/``arr_1``/``y``) file. See ``array_to_uint8_nchw`` for layouts and the
    value rule; ``array_range`` is ``data.array_range`` ("0,1", "-1,1" or None to detect floats)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"array file {path} does not exist: check --data")
    labels = None
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                key = next((k for k in _IMAGE_KEYS if k in npz.files), None)
                if key is None:
                    raise DataError(f"{path} has arrays {npz.files}; store the images under 'images' or 'arr_0'")
                array = npz[key]
                label_key = next((k for k in _LABEL_KEYS if k in npz.files), None)
                labels = npz[label_key] if label_key is not None else None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    lossy = LossyConversions(str(path), image_size)
    images = array_to_uint8_nchw(array, str(path), array_range=array_range, lossy=lossy)
    if channels is not None:
        images = convert_channels(images, channels)
    lossy.note_size(min(images.shape[-2:]), count=images.shape[0])
    lossy.warn()
    images = center_crop_resize(images, image_size)
    if labels is None:
        return ImageDataset(images, None, 0, [], str(path))
    labels_t = torch.as_tensor(np.asarray(labels).astype(np.int64)).reshape(-1)
    if labels_t.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {images.shape[0]} images but {labels_t.shape[0]} labels")
    if labels_t.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {int(labels_t.min())}")
    num_classes = int(labels_t.max()) + 1
    return ImageDataset(images, labels_t, num_classes, [str(i) for i in range(num_classes)], str(path))

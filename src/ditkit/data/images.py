"""Images from disk: an image folder or a ``.npz`` / ``.npy`` array file, held in memory.

Everything here ends as an ``ImageDataset``: a uint8 tensor ``(N, C, H, W)`` (values 0..255, scaled
to [-1, 1] only per batch, see ``ditkit.data.sampler``) and optional int64 labels ``(N,)``.
Centre crop and resize happen once, at load time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ditkit.config import ConfigError

__all__ = [
    "DataError",
    "ImageDataset",
    "IMAGE_EXTENSIONS",
    "load_image_folder",
    "load_array_file",
    "center_crop_resize",
    "convert_channels",
    "array_to_uint8_nchw",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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


def array_to_uint8_nchw(array: np.ndarray, where: str) -> torch.Tensor:
    """Accept (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3, 4}, uint8 0..255 or float
    in [0, 1] (or [-1, 1]); return (N, C, H, W) uint8 with C in {1, 3} (alpha dropped)."""
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            a = a.transpose(0, 3, 1, 2)  # NHWC (the ADM / numpy convention) -> NCHW
    else:
        raise DataError(f"{where}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W), got {a.shape}")
    if a.shape[1] == 4:
        a = a[:, :3]
    if a.shape[1] not in (1, 3):
        raise DataError(f"{where}: images need 1 or 3 channels, got shape {array.shape}")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if a.max() > 1.0:
            return torch.from_numpy(np.clip(a, 0, 255).round().astype(np.uint8))
    a = a.astype(np.float32)
    if a.min() < -1e-3:  # [-1, 1]
        a = (a + 1.0) / 2.0
    return torch.from_numpy((np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8))


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
    grayscale if every image is grayscale, else RGB.
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
    all_gray = True
    for path, label in items:
        try:
            with Image.open(path) as im:
                im.load()
                gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                im = im.convert("L" if gray else "RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                if side != image_size:
                    im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
                pixels = np.asarray(im, dtype=np.uint8)
        except Exception:  # PIL raises many types for truncated / corrupt / non-image files
            skipped.append(path)
            continue
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


def load_array_file(path: str | Path, image_size: int, channels: Optional[int] = None) -> ImageDataset:
    """Load a ``.npy`` (images only) or ``.npz`` (images under ``images``/``arr_0``/``x``, optional
    labels under ``labels``/``arr_1``/``y``) file. See ``array_to_uint8_nchw`` for layouts."""
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
    images = array_to_uint8_nchw(array, str(path))
    if channels is not None:
        images = convert_channels(images, channels)
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

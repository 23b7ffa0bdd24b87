"""Image formats at the evaluation boundary.

Three representations meet here:
- model space: float tensors (N, C, H, W) in [-1, 1] (what samplers return and datasets yield);
- uint8 NCHW tensors: what every feature extractor in `ditkit.eval` consumes. Samples are
  quantised to 8 bits exactly as a PNG would store them, so a tensor of samples and the same
  samples saved to disk score the same;
- ADM-style `.npz` (guided-diffusion / DiT `sample_ddp.py`): `arr_0` uint8 (N, H, W, C) and, for
  class-conditional samples, `arr_1` int (N,) requested labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditkit.fileio import atomic_path


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise float images (N, C, H, W) in [-1, 1] to uint8 (N, C, H, W): round((x + 1) * 127.5).

    Values outside [-1, 1] are clamped. uint8 input is returned unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1] or uint8, got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf (a diverged sampler?); cannot quantise them")
    return torch.floor((images.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


def uint8_to_images(images: torch.Tensor | np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float32 (N, C, H, W) in [-1, 1] (x / 127.5 - 1).

    Args:
        images: uint8 (N, C, H, W), or (N, H, W, C) with `channels_last=True` (the `.npz` layout).
    """
    tensor = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got dtype {tensor.dtype}")
    if tensor.ndim != 4:
        raise ValueError(f"expected 4-D images, got shape {tuple(tensor.shape)}")
    if channels_last:
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.contiguous().to(torch.float32) / 127.5 - 1.0


def _load_npz(path: str | Path) -> np.lib.npyio.NpzFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no samples file at {path}; pass an ADM-style .npz with arr_0 (N, H, W, C) uint8")
    return np.load(path, allow_pickle=False)


def load_npz_samples(path: str | Path) -> np.ndarray:
    """Read the samples of an ADM-style `.npz`: `arr_0`, uint8 (N, H, W, C)."""
    with _load_npz(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has arrays {data.files}; an ADM-style samples file stores images in 'arr_0'")
        samples = data["arr_0"]
    if samples.dtype != np.uint8 or samples.ndim != 4:
        raise ValueError(
            f"{path}: arr_0 must be uint8 (N, H, W, C), got {samples.dtype} {samples.shape}; "
            "convert float samples with ditkit.eval.images_to_uint8 first"
        )
    if samples.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 last axis must be channels (1 or 3), got shape {samples.shape}")
    return samples


def load_npz_labels(path: str | Path) -> np.ndarray | None:
    """Requested class labels of an ADM-style `.npz` (`arr_1`, (N,) int64), or None if absent."""
    with _load_npz(path) as data:
        if "arr_1" not in data.files:
            return None
        labels = data["arr_1"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: arr_1 must be (N,) integer labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def save_npz_samples(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Write samples (N, C, H, W) in [-1, 1] (or uint8) as an ADM-style `.npz` (arr_0 NHWC uint8, arr_1 labels)."""
    arr = images_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    arrays = [arr] if labels is None else [arr, labels.cpu().numpy().astype(np.int64)]
    path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")  # np.savez's own naming
    with atomic_path(path) as tmp:
        np.savez(tmp, *arrays)

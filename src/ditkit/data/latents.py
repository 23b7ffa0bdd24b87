"""Latent cache: encode a dataset through a VAE once, train from the cache every epoch.

For every image the cache stores the VAE posterior's mean and std, already in DiT space (see
``ditkit.interop.vae``), so each epoch draws a fresh sample ``z = mean + std * noise`` as training
through the VAE would (Rombach et al. 2022, sec. 3). With ``hflip`` it also stores the moments of
the horizontally flipped image (a flipped image's latent is not the flipped latent), and the
sampler picks a variant per image per epoch.

Clips (video datasets, ``(N, C, F, H, W)``) are encoded frame by frame (Latte trains on per-frame
latents of an image VAE) and stored as ``(N, V, c, F, h, w)``; everything else is shape-agnostic.

Layout of ``<cache_root>/latents-<key[:16]>/``: ``mean.npy`` and ``std.npy`` (N, V, c, h, w),
V = 2 with flips (variant 1 the flipped image) else 1; ``labels.npy`` (N,) int64 when labelled;
``meta.json`` last (its presence marks a complete cache). The key hashes the data (pixels after
crop/resize, and labels), the VAE (config + weights), the image size, the flip setting and the
storage dtype, so changing any of them builds a new cache instead of reading a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ditkit.data.images import DataError, ImageDataset
from ditkit.data.sampler import ResumableEpochOrder

__all__ = [
    "LatentEncoder",
    "LatentCache",
    "LatentBatchSampler",
    "dataset_fingerprint",
    "latent_cache_key",
    "build_latent_cache",
    "open_latent_cache",
]

CACHE_VERSION = 1


class LatentEncoder(Protocol):
    """What the cache needs of a VAE (``ditkit.interop.vae.LatentVAE`` is one)."""

    fingerprint: str
    downsample: int
    latent_channels: int

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """sha256 of the images (uint8, after crop/resize) and labels."""
    h = hashlib.sha256()
    images = dataset.images.contiguous()
    h.update(repr(tuple(images.shape)).encode())
    flat = images.view(-1)
    step = 1 << 26
    for start in range(0, flat.numel(), step):
        h.update(flat[start : start + step].numpy().tobytes())
    if dataset.labels is not None:
        h.update(dataset.labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def latent_cache_key(data_fingerprint: str, vae_fingerprint: str, image_size: int, hflip: bool, dtype: str) -> str:
    """The cache key: changes whenever the data, the VAE, the image size, flips or dtype change."""
    record = json.dumps(
        {
            "version": CACHE_VERSION,
            "data": data_fingerprint,
            "vae": vae_fingerprint,
            "image_size": image_size,
            "hflip": hflip,
            "dtype": dtype,
        },
        sort_keys=True,
    )
    return hashlib.sha256(record.encode()).hexdigest()


class LatentCache:
    """A complete cache directory, opened read-only (arrays memory-mapped unless `in_memory`).

    mean, std: (N, V, c, h, w) numpy arrays in DiT space; labels: (N,) int64 tensor or None.
    `reused` says whether `build_latent_cache` found it on disk instead of encoding.
    """

    def __init__(self, path: str | Path, in_memory: bool = False, reused: bool = True):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not a complete latent cache (no meta.json): build it again")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        mode = None if in_memory else "r"
        self.mean = np.load(self.path / "mean.npy", mmap_mode=mode)
        self.std = np.load(self.path / "std.npy", mmap_mode=mode)
        labels = self.path / "labels.npy"
        self.labels = torch.from_numpy(np.load(labels)) if labels.is_file() else None
        self.num_classes: int = self.meta["num_classes"]
        self.reused = reused

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def num_variants(self) -> int:
        return self.mean.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(c, h, w) of one latent: the DiT's in_channels and input_size ((c, F, h, w) for clips)."""
        return tuple(self.mean.shape[2:])

    @property
    def scaling_factor(self) -> float:
        return float(self.meta["vae"]["scaling_factor"])

    def moments(self, index: torch.Tensor, variant: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (B, c, h, w) float32 ((B, c, F, h, w) for clips), for dataset items
        `index` (B,) and variants (B,) (None: variant 0, the unflipped image)."""
        idx = index.cpu().numpy()
        var = np.zeros_like(idx) if variant is None else variant.cpu().numpy().astype(idx.dtype)
        mean = torch.from_numpy(np.ascontiguousarray(self.mean[idx, var])).float()
        std = torch.from_numpy(np.ascontiguousarray(self.std[idx, var])).float()
        return mean, std


def open_latent_cache(
    dataset: ImageDataset, vae: LatentEncoder, cache_root: str | Path, hflip: bool = False, dtype: str = "float32"
) -> Optional[LatentCache]:
    """The complete cache for this (data, VAE, image size, hflip, dtype), or None if there is none."""
    key = latent_cache_key(dataset_fingerprint(dataset), vae.fingerprint, dataset.image_size, hflip, dtype)
    path = Path(cache_root) / f"latents-{key[:16]}"
    if (path / "meta.json").is_file() and json.loads((path / "meta.json").read_text()).get("key") == key:
        return LatentCache(path)
    return None


@torch.no_grad()
def build_latent_cache(
    dataset: ImageDataset,
    vae: LatentEncoder,
    cache_root: str | Path,
    *,
    hflip: bool = False,
    batch_size: int = 32,
    dtype: str = "float32",
    progress: bool = False,
    in_memory: bool = False,
) -> LatentCache:
    """Encode `dataset` through `vae` into ``cache_root`` once; later calls with the same data,
    VAE, image size, `hflip` and `dtype` reuse it (``cache.reused``), any change builds a new one.

    `dtype` "float16" halves the disk size (rounding ~5e-4 relative, below the SD VAE's posterior
    std). Writing goes to a temporary folder renamed into place, so a crash leaves no half cache.
    """
    if dtype not in ("float32", "float16"):
        raise DataError(f"latent cache dtype {dtype!r}: choose 'float32' or 'float16'")
    if dataset.image_size % vae.downsample:
        raise DataError(f"--image-size {dataset.image_size} is not a multiple of the VAE downsampling {vae.downsample}")
    key = latent_cache_key(dataset_fingerprint(dataset), vae.fingerprint, dataset.image_size, hflip, dtype)
    root = Path(cache_root)
    final = root / f"latents-{key[:16]}"
    if (final / "meta.json").is_file() and json.loads((final / "meta.json").read_text()).get("key") == key:
        return LatentCache(final, in_memory=in_memory, reused=True)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    n, variants = len(dataset), 2 if hflip else 1
    side = dataset.image_size // vae.downsample
    clips = dataset.images.ndim == 5  # (N, C, F, H, W): encode every frame, keep (c, F, h, w) per clip
    if clips and hflip:
        raise DataError("hflip turns a clip moving right into one moving left: set data.hflip=false for video")
    frames = int(dataset.images.shape[2]) if clips else 1
    shape = (n, variants, vae.latent_channels, *((frames,) if clips else ()), side, side)
    batch_size = max(1, batch_size // frames)  # about batch_size frames per VAE call
    mean = np.lib.format.open_memmap(tmp / "mean.npy", mode="w+", dtype=dtype, shape=shape)
    std = np.lib.format.open_memmap(tmp / "std.npy", mode="w+", dtype=dtype, shape=shape)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="encoding latents", unit="batch")
    for start in starts:
        x = dataset.images[start : start + batch_size].float().div(127.5).sub(1.0)  # [-1, 1]
        for v in range(variants):
            if clips:  # (B, C, F, H, W) -> B*F frames -> moments (B, c, F, h, w)
                B, C, F_, H, W = x.shape
                m, s = vae.encode_moments(x.transpose(1, 2).reshape(B * F_, C, H, W))
                m, s = (t.view(B, F_, *t.shape[1:]).transpose(1, 2) for t in (m, s))
            else:
                m, s = vae.encode_moments(x.flip(-1) if v == 1 else x)
            mean[start : start + len(x), v] = m.cpu().numpy().astype(dtype)
            std[start : start + len(x), v] = s.cpu().numpy().astype(dtype)
    mean.flush()
    std.flush()
    del mean, std
    if dataset.labels is not None:
        np.save(tmp / "labels.npy", dataset.labels.to(torch.int64).numpy())
    meta = {
        "key": key,
        "version": CACHE_VERSION,
        "num_items": n,
        "image_size": dataset.image_size,
        "latent_shape": list(shape[2:]),
        "hflip": hflip,
        "dtype": dtype,
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "source": dataset.source,
        "vae": vae.describe(),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)  # an incomplete cache under the same key
    os.replace(tmp, final)
    return LatentCache(final, in_memory=in_memory, reused=False)


class LatentBatchSampler(ResumableEpochOrder):
    """Yields ``(z (B, c, h, w) float32 in DiT space, y (B,) int64 or None)`` forever, like
    ``ditkit.data.EpochBatchSampler`` (same seeded epoch order, same resumable state).

    Each item draws ``z = mean + std * noise`` (a fresh posterior sample every epoch), or the
    mean when `sample_posterior` is False. With `hflip` the flip variant is chosen per image per
    epoch (the cache must hold both). The noise of a batch is a function of (seed, epoch,
    position), so resuming reproduces the stream exactly.
    """

    def __init__(
        self,
        cache: LatentCache,
        batch_size: int,
        seed: int = 0,
        hflip: bool = False,
        device: torch.device | str = "cpu",
        sample_posterior: bool = True,
    ):
        if batch_size > len(cache):
            raise DataError(
                f"batch size {batch_size} is larger than the latent cache ({len(cache)} items): lower --global-batch-size"
            )
        if hflip and cache.num_variants < 2:
            raise DataError("hflip needs a latent cache built with hflip=True (it stores the flipped images' latents)")
        self.cache, self.device = cache, torch.device(device)
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.sample_posterior = sample_posterior
        self.labels = cache.labels
        self.steps_per_epoch = len(cache) // batch_size
        self.epoch, self.position = 0, 0
        self._plan_epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None
        self._flip: Optional[torch.Tensor] = None

    def _plan(self) -> None:
        if self._plan_epoch == self.epoch:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.cache)
        self._perm = torch.randperm(n, generator=g)
        self._flip = (torch.rand(n, generator=g) < 0.5).long() if self.hflip else None
        self._plan_epoch = self.epoch

    def next_batch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The next batch; advances the position (and the epoch at its end)."""
        self._plan()
        assert self._perm is not None
        lo = self.position * self.batch_size
        idx = self._perm[lo : lo + self.batch_size]
        variant = self._flip[lo : lo + self.batch_size] if self._flip is not None else None
        mean, std = self.cache.moments(idx, variant)
        if self.sample_posterior:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.position)
            z = mean + std * torch.randn(mean.shape, generator=g)
        else:
            z = mean
        y = self.labels[idx].to(self.device) if self.labels is not None else None
        self._advance()
        return z.to(self.device), y

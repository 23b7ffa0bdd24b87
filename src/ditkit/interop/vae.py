"""A local diffusers ``AutoencoderKL`` folder as the latent space of a DiT (Rombach et al. 2022).

Latents are scaled as Stable Diffusion does: ``z = (latent - shift_factor) * scaling_factor``, both
read from the VAE's config.json (0.18215 and no shift for the SD VAEs DiT uses), so the DiT sees
roughly unit-variance inputs. Nothing is downloaded: the folder must be on disk. diffusers is
imported only when a VAE is loaded (``pip install ditkit[diffusers]``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from ditkit.interop.common import InteropError

__all__ = ["LatentVAE", "load_vae", "vae_folder"]


def vae_folder(path: str | Path) -> Path:
    """The AutoencoderKL folder at `path` (or its ``vae/`` subfolder for a pipeline folder)."""
    root = Path(path)
    if (root / "model_index.json").is_file() and (root / "vae" / "config.json").is_file():
        root = root / "vae"
    config = root / "config.json"
    if not config.is_file():
        raise InteropError(
            f"--vae {path}: no config.json; point it at a local diffusers AutoencoderKL folder "
            "(e.g. a saved stabilityai/sd-vae-ft-ema) or a pipeline folder holding vae/"
        )
    name = json.loads(config.read_text()).get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise InteropError(f"--vae {path}: config.json is a {name}, not an AutoencoderKL")
    return root


def _fingerprint(folder: Path) -> str:
    """sha256 over config.json and every weights file, so any change to the VAE changes it."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.name.startswith("diffusion_pytorch_model")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class LatentVAE:
    """A frozen AutoencoderKL with the scaling of its config.

    encode_moments: x (B, C, H, W) in [-1, 1] -> (mean, std), each (B, c, H/f, W/f), already
    scaled into DiT space (mean = (mu - shift) * scale, std = sigma * scale).
    decode: z (B, c, h, w) in DiT space -> x (B, C, h f, w f) in [-1, 1] (clamped).
    `downsample` is f; `latent_channels` is c; `fingerprint` hashes config + weights.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise InteropError("--vae needs diffusers: pip install 'ditkit[diffusers]'") from None
        self.path = vae_folder(path)
        self.device, self.dtype = torch.device(device), dtype
        self.vae = AutoencoderKL.from_pretrained(str(self.path), local_files_only=True, torch_dtype=dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor) if getattr(config, "shift_factor", None) is not None else 0.0
        self.latent_channels = int(config.latent_channels)
        self.in_channels = int(config.in_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.fingerprint = _fingerprint(self.path)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of the VAE (for run configs and cache metadata)."""
        return {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }

    def latent_size(self, image_size: int) -> int:
        """Latent side for a square image of `image_size` pixels."""
        if image_size % self.downsample:
            raise InteropError(
                f"--image-size {image_size} is not a multiple of the VAE downsampling factor {self.downsample}"
            )
        return image_size // self.downsample

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_channels:
            return x
        if x.shape[1] == 1 and self.in_channels == 3:
            return x.expand(-1, 3, -1, -1)  # grayscale data through an RGB VAE
        raise InteropError(f"images have {x.shape[1]} channels but the VAE takes {self.in_channels}")

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std in DiT space for images x (B, C, H, W) in [-1, 1]."""
        x = self._match_channels(x).to(self.device, self.dtype)
        posterior = self.vae.encode(x).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        std = posterior.std.float() * self.scaling_factor
        return mean, std

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One posterior sample z = mean + std * noise in DiT space."""
        mean, std = self.encode_moments(x)
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device).to(mean.device)
        return mean + std * noise

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Latents z (B, c, h, w) in DiT space -> images (B, C, h f, w f) in [-1, 1], `batch_size` at a time."""
        out = []
        for chunk in z.split(batch_size):
            latent = chunk.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(latent).sample.float().clamp_(-1, 1).cpu())
        return torch.cat(out)

    def decode_to(self, z: torch.Tensor, channels: Optional[int] = None, batch_size: int = 16) -> torch.Tensor:
        """``decode`` then match the training images' channels: (B, c, h, w) -> (B, channels, h f, w f)
        in [-1, 1]. An RGB VAE trained on grayscale data (fed as 3 equal channels) gives back the
        channel mean."""
        x = self.decode(z, batch_size)
        if channels is None or channels == x.shape[1]:
            return x
        if channels == 1:
            return x.mean(dim=1, keepdim=True)
        raise InteropError(f"the VAE decodes {x.shape[1]} channels, the data has {channels}")


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LatentVAE:
    """Load a local AutoencoderKL folder (no network) as a LatentVAE."""
    return LatentVAE(path, device=device, dtype=dtype)

"""Fréchet Video Distance (Unterthiner et al. 2018, arXiv 1812.01717) with I3D weights the user supplies.

No package ships I3D weights and nothing is downloaded here, so ditkit computes FVD only when
``ditkit eval --i3d-weights PATH`` (``evaluate_video(..., i3d_weights=PATH)``) names a local copy of
the TorchScript I3D that the PyTorch FVD ports share (``i3d_torchscript.pt``: the Kinetics-400
Inception-I3D of Carreira & Zisserman 2017, scripted by StyleGAN-V, Skorokhodov et al. 2022, and
used by universome/fvd-comparison, which shows it matches the original TensorFlow FVD). Without it,
nothing in ditkit is called FVD.

Protocol (fvd-comparison's ``our_fvd.py``, the one measured to agree with the TensorFlow code):
each clip ``(C, F, H, W)`` in [-1, 1] is taken to RGB (gray repeated), its frames bilinearly resized
so the short side is 224 and centre-cropped to 224 x 224, kept in [-1, 1], and the detector is called
as ``detector(x (B, 3, F, 224, 224), rescale=False, resize=False, return_features=True)``, which
returns the 400 logits before the softmax per clip. FVD is the Fréchet distance between the
Gaussians of the generated and the real clips' features (``ditkit.eval.frechet``). The I3D halves
time four times and pools two frames, so clips need at least ``MIN_I3D_FRAMES`` (10) frames: shorter
runs are refused before anything is drawn (moving_digits trains on 8: train with
``data.num_frames=16``). Published FVDs use 16-frame clips and thousands of them (2,048 in
StyleGAN-V); the report says whether a number was computed that way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ditkit.config import ConfigError
from ditkit.eval.frechet import feature_stats, frechet_distance

__all__ = ["I3D_SIZE", "load_i3d", "i3d_features", "fvd", "preprocess_for_i3d", "check_fvd_frames",
           "STANDARD_FVD_FRAMES", "STANDARD_FVD_CLIPS", "MIN_I3D_FRAMES"]

I3D_SIZE = 224
STANDARD_FVD_FRAMES = 16  # clip length of the original protocol (Unterthiner et al. 2018)
STANDARD_FVD_CLIPS = 2048  # clips per set in the published PyTorch-port numbers (StyleGAN-V)
MIN_I3D_FRAMES = 10  # the Kinetics I3D's temporal strides and final pooling need this many


def check_fvd_frames(frames: int) -> None:
    """``ConfigError`` unless clips of ``frames`` frames fit the I3D (at least ``MIN_I3D_FRAMES``)."""
    if frames < MIN_I3D_FRAMES:
        raise ConfigError(f"--i3d-weights: FVD's I3D needs clips of at least {MIN_I3D_FRAMES} frames and this run draws "
                          f"{frames}; train with --set data.num_frames={STANDARD_FVD_FRAMES} (the standard FVD length)")


def load_i3d(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """The TorchScript I3D at ``path`` in eval mode on ``device``; ``ConfigError`` naming
    ``--i3d-weights`` for a missing file or one that is not a TorchScript archive."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--i3d-weights {path}: no such file; pass a local i3d_torchscript.pt (nothing is downloaded)")
    try:
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; the published I3D is one
            warnings.simplefilter("ignore", DeprecationWarning)
            detector = torch.jit.load(str(p), map_location=device)
    except Exception as err:  # torch.jit raises RuntimeError / ValueError for non-archives
        raise ConfigError(f"--i3d-weights {path} is not a TorchScript I3D (i3d_torchscript.pt): {str(err).splitlines()[0]}") from None
    return detector.eval()


def preprocess_for_i3d(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, F, H, W) in [-1, 1], C = 1 or 3 -> (N, 3, F, 224, 224) float32 in [-1, 1]: gray to RGB,
    frames resized (bilinear) so the short side is 224, then centre-cropped."""
    if clips.ndim != 5 or clips.shape[1] not in (1, 3):
        raise ValueError(f"clips must be (N, 1 or 3, F, H, W), got {tuple(clips.shape)}")
    N, C, F_, H, W = clips.shape
    frames = clips.float().transpose(1, 2).reshape(N * F_, C, H, W).expand(-1, 3, -1, -1)
    scale = I3D_SIZE / min(H, W)
    size = (max(I3D_SIZE, round(H * scale)), max(I3D_SIZE, round(W * scale)))
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - I3D_SIZE) // 2, (size[1] - I3D_SIZE) // 2
    frames = frames[:, :, top: top + I3D_SIZE, left: left + I3D_SIZE].clamp(-1, 1)
    return frames.reshape(N, F_, 3, I3D_SIZE, I3D_SIZE).transpose(1, 2).contiguous()


@torch.no_grad()
def i3d_features(detector: Any, clips: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, D) float64 features (the 400 pre-softmax logits of the Kinetics I3D) of clips (N, C, F, H, W)."""
    device = next(iter(detector.parameters()), torch.empty(0)).device
    out = []
    for lo in range(0, len(clips), batch_size):
        x = preprocess_for_i3d(clips[lo: lo + batch_size]).to(device)
        feats = detector(x, rescale=False, resize=False, return_features=True)
        out.append(feats.reshape(len(x), -1).double().cpu())
    return torch.cat(out)


def fvd(detector: Any, generated: torch.Tensor, real: torch.Tensor, batch_size: int = 8) -> float:
    """FVD between two sets of clips (N, C, F, H, W) in [-1, 1] (see the module docstring)."""
    a, b = i3d_features(detector, generated, batch_size), i3d_features(detector, real, batch_size)
    return frechet_distance(*feature_stats(a.numpy()), *feature_stats(b.numpy()))

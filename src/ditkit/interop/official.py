"""Official facebookresearch/DiT checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, and the
``{"model", "ema", "opt", "args"}`` files its train.py writes).

ditkit's DiT uses the official key names and maths (see docs/architecture.md), so an official
state dict loads strictly: every key and shape is checked, and a mismatch says which
``--model / --image-size / --num-classes / --learn-sigma`` would fit.

Files are read with ``torch.load(weights_only=True)``; the one non-tensor class training
checkpoints hold, ``argparse.Namespace``, is allowed through torch's safe-globals list. Nothing
else is unpickled.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from ditkit.models.dit import DIT_PRESETS, DiT, build_dit, sincos_2d
from ditkit.interop.common import (
    InteropError,
    check_state_dict,
    infer_dit_kwargs,
    strip_prefixes,
    suggest_flags,
)

__all__ = ["OfficialCheckpoint", "read_official_checkpoint", "import_official_dit", "torch_load_safe"]

# The Stable Diffusion VAE used by the official DiT downsamples by 8 into 4 latent channels.
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 4


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` allowing ``argparse.Namespace`` and nothing else."""
    allowed = [argparse.Namespace]
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: scoped allow-list
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals(allowed)  # torch 2.4
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InteropError(
            f"{path} holds Python objects other than tensors and argparse.Namespace, which ditkit "
            f"refuses to unpickle (weights_only=True). If you trust the file, load it yourself and "
            f"re-save just its state dict: torch.save(ckpt['ema'], 'weights.pt'). Details: {err}"
        ) from None


@dataclass
class OfficialCheckpoint:
    """An official DiT checkpoint read from disk.

    state_dict: official key names, EMA weights when the file has them.
    kind: "raw" (a bare state dict, as released) or "training" ({"model", "ema", "opt", "args"}).
    weights: which entry the weights came from: "state_dict", "ema" or "model".
    args: the training run's argparse arguments as a dict (training checkpoints), else None.
    """

    path: str
    state_dict: dict[str, torch.Tensor]
    kind: str
    weights: str
    args: Optional[dict[str, Any]] = None

    def meta(self) -> dict[str, Any]:
        """A JSON-ready record of where the weights came from."""
        args = {k: v for k, v in (self.args or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}
        return {"format": "official-dit", "path": self.path, "kind": self.kind, "weights": self.weights, "args": args}


def read_official_checkpoint(path: str | Path, use_ema: bool = True) -> OfficialCheckpoint:
    """Read a raw state dict (``.pt``/``.pth``, or ``.safetensors``) or a training checkpoint.

    A training checkpoint gives its ``"ema"`` weights (``"model"`` when `use_ema` is False or it
    has no EMA). ``module.`` / ``_orig_mod.`` key prefixes are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return OfficialCheckpoint(str(path), strip_prefixes(load_file(str(path))), "raw", "state_dict")
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        raise InteropError(f"{path} holds a {type(obj).__name__}, not a state dict or a training checkpoint dict")
    if "model" in obj or "ema" in obj:
        key = "ema" if (use_ema and "ema" in obj) else "model"
        if key not in obj:
            raise InteropError(f"{path} is a training checkpoint without a 'model' entry (keys: {list(obj)})")
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else None)
        return OfficialCheckpoint(str(path), strip_prefixes(obj[key]), "training", key, args)
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InteropError(
            f"{path} is a dict but neither a state dict nor an official training checkpoint "
            f"(keys: {', '.join(map(str, list(obj)[:8]))})"
        )
    return OfficialCheckpoint(str(path), strip_prefixes(obj), "raw", "state_dict")


def import_official_dit(
    path: str | Path | OfficialCheckpoint,
    model: Optional[str] = "DiT-XL/2",
    image_size: Optional[int] = 256,
    num_classes: Optional[int] = 1000,
    learn_sigma: Optional[bool] = True,
    use_ema: bool = True,
    **overrides: Any,
) -> DiT:
    """Build the DiT an official checkpoint was trained as and load it strictly (eval mode).

    `image_size` is in pixels: the model works on the VAE latent, ``image_size // 8`` squared with
    4 channels. `model`, `image_size`, `num_classes` or `learn_sigma` set to None are read off the
    checkpoint's tensor shapes. `overrides` go to the DiT constructor (e.g. ``grad_checkpointing``).
    The timestep sinusoid uses the official convention (``timestep_freq_shift=0``).

    Raises InteropError naming the keys that do not fit and the flags that would.
    """
    ckpt = path if isinstance(path, OfficialCheckpoint) else read_official_checkpoint(path, use_ema=use_ema)
    state = ckpt.state_dict
    info = infer_dit_kwargs(state, vae_downsample=VAE_DOWNSAMPLE)
    fits = f"This checkpoint looks like: {suggest_flags(info)}"
    if ckpt.args:
        known = {k: ckpt.args[k] for k in ("model", "image_size", "num_classes") if k in ckpt.args}
        if known:
            fits += f" (its training args say {known})"

    if model is None:
        model = info["preset"]
        if model is None:
            raise InteropError(f"{ckpt.path}: no preset matches the checkpoint's dimensions. {fits}")
    if model not in DIT_PRESETS:
        raise InteropError(f"unknown --model {model!r}; choose one of {', '.join(DIT_PRESETS)}. {fits}")
    if image_size is None:
        if "image_size" not in info:
            raise InteropError(f"{ckpt.path} has no pos_embed to read the image size from: pass --image-size")
        image_size = info["image_size"]
    if image_size % VAE_DOWNSAMPLE:
        raise InteropError(f"--image-size {image_size} is not a multiple of the VAE downsampling {VAE_DOWNSAMPLE}")
    kwargs: dict[str, Any] = dict(
        input_size=image_size // VAE_DOWNSAMPLE,
        in_channels=LATENT_CHANNELS,
        num_classes=info["num_classes"] if num_classes is None else num_classes,
        learn_sigma=info.get("learn_sigma", True) if learn_sigma is None else learn_sigma,
    )
    kwargs.update(overrides)
    try:
        net = build_dit(model, **kwargs)
    except ValueError as err:
        raise InteropError(f"cannot build {model} at --image-size {image_size}: {err}. {fits}") from None
    check_state_dict(net, state, what=f"checkpoint {Path(ckpt.path).name}", hint=fits)

    if "pos_embed" in state and not net.use_rope:
        table = torch.as_tensor(sincos_2d(state["pos_embed"].shape[-1], net.grid_size)).float()
        if not torch.allclose(state["pos_embed"][0].float(), table, atol=1e-5):
            warnings.warn(
                f"{ckpt.path}: its pos_embed differs from the 2-D sin-cos table; loading it as stored "
                "(the model keeps the file's table, but fine-tuning at another size recomputes it)",
                stacklevel=2,
            )
    net.load_state_dict(state, strict=True)
    return net.eval()

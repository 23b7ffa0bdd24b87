"""Shared pieces of the interop room: a DiT's constructor arguments, strict state-dict checks, and
the small on-disk form of an imported model (``save_imported`` / ``load_imported``).

State dicts here always use the official facebookresearch/DiT key names, which are ditkit's own
(``x_embedder.proj.weight``, ``blocks.3.attn.qkv.weight``, ``final_layer.linear.bias``, ...).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ditkit.config import Config, ConfigError, DataConfig, ModelConfig, ObjectiveConfig, RunConfig, SampleConfig
from ditkit.fileio import atomic_path, write_text
from ditkit.models.dit import DIT_PRESETS, DiT
from ditkit.models.layers import RMSNorm

__all__ = [
    "InteropError",
    "dit_kwargs",
    "preset_name",
    "infer_dit_kwargs",
    "check_state_dict",
    "strip_prefixes",
    "save_imported",
    "load_imported",
    "IMPORTED_CONFIG",
    "imported_config",
    "save_imported_run",
    "source_timestep_freq_shift",
]

IMPORTED_CONFIG = "model_config.json"


class InteropError(ConfigError):
    """A checkpoint or folder does not fit what was asked; the message says what would fit.
    (A ConfigError, so the command line reports it as a usage error.)"""


# ------------------------------------------------------------------------------------------------
# A DiT's constructor arguments, read back from the module (DiT does not store them).
# ------------------------------------------------------------------------------------------------


def _mlp_ratio(hidden_size: int, mlp: nn.Module) -> float:
    """Invert the Mlp width rule of ditkit.models.layers.Mlp (GELU: int(D r); SwiGLU: int(2 int(D r) / 3))."""
    width = mlp.fc2.in_features
    if mlp.kind == "gelu":
        return width / hidden_size
    guess = width * 1.5 / hidden_size
    for step in range(-64, 65):  # search ratios near the guess on a 1/64 grid
        ratio = round(guess * 64) / 64 + step / 64
        if ratio > 0 and int(2 * int(hidden_size * ratio) / 3) == width:
            return ratio
    raise InteropError(f"cannot recover mlp_ratio from a SwiGLU MLP of width {width} at hidden size {hidden_size}")


def dit_kwargs(model: DiT) -> dict[str, Any]:
    """The keyword arguments that rebuild `model`'s architecture: ``DiT(**dit_kwargs(model))``."""
    block = model.blocks[0]
    hidden = model.x_embedder.proj.out_channels
    return dict(
        input_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=hidden,
        depth=len(model.blocks),
        num_heads=model.num_heads,
        mlp_ratio=_mlp_ratio(hidden, block.mlp),
        class_dropout_prob=model.y_embedder.dropout_prob if model.y_embedder is not None else 0.0,
        num_classes=model.num_classes,
        learn_sigma=model.learn_sigma,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        norm="rmsnorm" if isinstance(block.norm1, RMSNorm) else "layernorm",
        mlp=block.mlp.kind,
        pos_embed="rope" if model.use_rope else "sincos",
        grad_checkpointing=model.grad_checkpointing,
        timestep_freq_shift=float(model.t_embedder.freq_shift),
        decoder_depth=len(getattr(model, "decoder_blocks", ())),
    )


def preset_name(depth: int, hidden_size: int, patch_size: int) -> str | None:
    """The DIT_PRESETS name with these dimensions, or None."""
    for name, preset in DIT_PRESETS.items():
        if (preset["depth"], preset["hidden_size"], preset["patch_size"]) == (depth, hidden_size, patch_size):
            return name
    return None


# ------------------------------------------------------------------------------------------------
# What a state dict (official key names) says about the model it came from.
# ------------------------------------------------------------------------------------------------


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers' key prefixes that DDP (``module.``) and torch.compile (``_orig_mod.``) add."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def infer_dit_kwargs(state_dict: Mapping[str, torch.Tensor], vae_downsample: int = 8) -> dict[str, Any]:
    """Read the architecture off the tensor shapes of an official-key state dict.

    Returns the DiT keyword arguments that can be inferred (``num_heads`` only through a preset,
    since no tensor shape holds it) plus ``"preset"`` (a DIT_PRESETS name or None) and
    ``"image_size"`` (pixels: latent size x `vae_downsample` for 4-channel latents, else the
    input size). Hidden size from ``x_embedder``, patch from its kernel, depth from the block
    count, grid from ``pos_embed``, classes from the label table rows - 1, learn_sigma from the
    final linear's output features.
    """
    if "x_embedder.proj.weight" not in state_dict:
        raise InteropError(
            "not a DiT state dict: no 'x_embedder.proj.weight' key "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    conv = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    info: dict[str, Any] = dict(patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth)
    if "pos_embed" in state_dict:
        grid = math.isqrt(state_dict["pos_embed"].shape[1])
        info["input_size"] = grid * patch
    table = state_dict.get("y_embedder.embedding_table.weight")
    info["num_classes"] = table.shape[0] - 1 if table is not None else 0
    final = state_dict.get("final_layer.linear.weight")
    if final is not None:
        out_channels = final.shape[0] // (patch * patch)
        info["learn_sigma"] = out_channels == 2 * in_channels
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != 4 * hidden:
        info["mlp_ratio"] = fc1.shape[0] / hidden
    if "blocks.0.attn.q_norm.weight" in state_dict:
        info["qk_norm"] = True
    name = preset_name(depth, hidden, patch)
    info["preset"] = name
    if name is not None:
        info["num_heads"] = DIT_PRESETS[name]["num_heads"]
    if "input_size" in info:
        info["image_size"] = info["input_size"] * (vae_downsample if in_channels == 4 else 1)
    return info


def suggest_flags(info: Mapping[str, Any]) -> str:
    """`--model ... --image-size ... --num-classes ... --learn-sigma ...` for inferred kwargs."""
    model = info.get("preset") or (
        f"<no preset: depth {info['depth']}, hidden size {info['hidden_size']}, patch {info['patch_size']}>"
    )
    parts = [f"--model {model}"]
    if "image_size" in info:
        parts.append(f"--image-size {info['image_size']}")
    parts.append(f"--num-classes {info['num_classes']}")
    if "learn_sigma" in info:
        parts.append(f"--learn-sigma {str(info['learn_sigma']).lower()}")
    return " ".join(parts)


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint", hint: str = ""
) -> None:
    """Raise InteropError unless `state_dict` has exactly `model`'s keys with the same shapes.

    The message names missing, unexpected and mismatched keys (a few of each) and ends with `hint`.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong):
        return

    def head(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

    lines = [f"the {what} does not fit the model:"]
    if wrong:
        lines.append(f"  {len(wrong)} key(s) with other shapes: {head(wrong)}")
    if missing:
        lines.append(f"  missing from the {what}: {head(missing)}")
    if unexpected:
        lines.append(f"  not in the model: {head(unexpected)}")
    if hint:
        lines.append(hint)
    raise InteropError("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# The on-disk form of an imported model.
# ------------------------------------------------------------------------------------------------


def _contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_imported(model: DiT, out_dir: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a checkpoint directory: ``model.safetensors`` and ``ema.safetensors``
    (the same weights: imported weights are the EMA ones) and ``model_config.json`` holding
    ``{"dit_kwargs": DiT constructor arguments, "preset": name or null, "source": meta}``.

    The lead's checkpoint schema (docs/architecture.md) maps ``dit_kwargs`` onto its config.json;
    ``load_imported`` reads this directory back. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _contiguous(model.state_dict())
    for name in ("model.safetensors", "ema.safetensors"):
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    kwargs = dit_kwargs(model)
    record = {
        "dit_kwargs": kwargs,
        "preset": preset_name(kwargs["depth"], kwargs["hidden_size"], kwargs["patch_size"]),
        "source": dict(meta or {}),
    }
    write_text(out / IMPORTED_CONFIG, json.dumps(record, indent=2) + "\n")
    return out


def load_imported(path: str | Path, use_ema: bool = True) -> DiT:
    """Rebuild a DiT from a directory written by `save_imported` (strict load, eval mode)."""
    path = Path(path)
    config = path / IMPORTED_CONFIG
    if not config.is_file():
        raise InteropError(f"{path} has no {IMPORTED_CONFIG}: it was not written by ditkit.interop.save_imported")
    kwargs = json.loads(config.read_text())["dit_kwargs"]
    model = DiT(**kwargs)
    weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
    state = load_file(str(weights))
    check_state_dict(model, state, what=str(weights))
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Imported models as standard ditkit runs (what `ditkit sample / info / eval` and --init-from read).
# ------------------------------------------------------------------------------------------------


def imported_config(
    model: DiT,
    image_size: int,
    *,
    vae_downsample: int = 8,
    pixel_channels: int = 3,
    dataset: str = "imagenet",
    vae: str | None = None,
    cfg_scale: float = 4.0,
) -> Config:
    """A full ditkit ``Config`` for an imported official-style latent DiT.

    Records what sampling must honour to follow the official algorithm: linear schedule over 1000
    steps, eps prediction with the learned-range variance (if the model has it), no clipping of x0
    (``objective.clip_x0 = 0``), 250 uniformly respaced DDPM steps, guidance on the first 3 of the 4
    latent eps channels (``sample.guide_channels = 3``, what the released DiT does; its FID numbers
    need it) at ``cfg_scale`` (4.0: the official sample.py default). The DiT works on
    ``image_size / vae_downsample`` latents with ``model.in_channels`` channels; ``vae`` (a local
    AutoencoderKL folder) is recorded for decoding, or left None (``--vae`` at sampling time).
    """
    kwargs = dit_kwargs(model)
    preset = preset_name(kwargs["depth"], kwargs["hidden_size"], kwargs["patch_size"])
    if model.input_size * vae_downsample != image_size:
        raise InteropError(
            f"--image-size {image_size} does not match the model's {model.input_size}x{model.input_size} latent at "
            f"downsampling {vae_downsample}: use --image-size {model.input_size * vae_downsample}"
        )
    model_cfg = ModelConfig(
        name=preset or "DiT-XL/2",  # every field below is explicit, so the preset only names it
        patch_size=kwargs["patch_size"], hidden_size=kwargs["hidden_size"], depth=kwargs["depth"],
        num_heads=kwargs["num_heads"], mlp_ratio=kwargs["mlp_ratio"], class_dropout_prob=kwargs["class_dropout_prob"],
        qk_norm=kwargs["qk_norm"], norm=kwargs["norm"], mlp=kwargs["mlp"], pos_embed=kwargs["pos_embed"],
        timestep_freq_shift=kwargs["timestep_freq_shift"],
    )
    latent_guided = 3 if model.in_channels == 4 else None
    return Config(
        recipe="import-dit",
        model=model_cfg,
        objective=ObjectiveConfig(
            kind="gaussian", prediction="eps", schedule="linear", num_timesteps=1000,
            learn_sigma=model.learn_sigma, clip_x0=0.0,
        ),
        data=DataConfig(
            dataset=dataset, image_size=image_size, channels=pixel_channels, num_classes=model.num_classes,
            hflip=True, vae=vae, latent_channels=model.in_channels, vae_downsample=vae_downsample,
        ),
        run=RunConfig(tensorboard=False),
        sample=SampleConfig(
            sampler="ddpm", num_sampling_steps=250, cfg_scale=cfg_scale, guide_channels=latent_guided,
            timestep_spacing="uniform",
        ),
    )


def save_imported_run(model: DiT, run_dir: str | Path, config: Config, meta: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a standard ditkit run directory and return its checkpoint directory::

        RUN/config.json                         the full Config (``imported_config``)
        RUN/model_config.json                   provenance: DiT kwargs, preset, source record
        RUN/checkpoints/step_0000000/           model.safetensors = ema.safetensors, config.json

    No ``state.pt``: an imported checkpoint samples, evaluates, exports and fine-tunes
    (``--init-from``), but cannot be resumed. The step directory is written to a temporary name
    and renamed into place, so readers never see it half written.
    """
    import os
    import shutil

    from ditkit.checkpoint_io import CONFIG_FILE, EMA_FILE, MODEL_FILE, step_dir_name
    from ditkit.builders import build_model

    rebuilt = build_model(config)  # the config alone must rebuild this architecture
    check_state_dict(rebuilt, model.state_dict(), what="imported model", hint="(a bug: imported_config lost a setting)")
    run = Path(run_dir)
    root = run / "checkpoints"
    final = root / step_dir_name(0)
    if final.exists():
        raise InteropError(f"{final} already exists: pick another --out, or delete it first")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = _contiguous(model.state_dict())
    header = {"format": "pt", "step": "0", "epoch": "", "source": "imported"}
    save_file(tensors, str(tmp / MODEL_FILE), metadata=header)
    save_file(tensors, str(tmp / EMA_FILE), metadata=header)  # released weights are the EMA ones
    (tmp / CONFIG_FILE).write_text(config.to_json())
    os.replace(tmp, final)
    write_text(run / CONFIG_FILE, config.to_json())
    kwargs = dit_kwargs(model)
    record = {
        "dit_kwargs": kwargs,
        "preset": preset_name(kwargs["depth"], kwargs["hidden_size"], kwargs["patch_size"]),
        "source": dict(meta or {}),
        "checkpoint": str(final),
    }
    write_text(run / IMPORTED_CONFIG, json.dumps(record, indent=2) + "\n")
    return final


# ------------------------------------------------------------------------------------------------
# The timestep convention of pretrained weights, read without loading them.
# ------------------------------------------------------------------------------------------------


def source_timestep_freq_shift(source: str | Path) -> float | None:
    """The ``timestep_freq_shift`` that `source`'s weights were trained with, from its metadata
    only (no tensors are read): 1 for a diffusers folder (``model_index.json``, or a
    ``config.json`` with a ``_class_name``), 0 for an official ``.pt``/``.pth``, the recorded value
    for a ditkit run or checkpoint directory (a run's ``config.json``: unset means the DiT default
    0; ``model_config.json``: ``dit_kwargs``). None when nothing records it (a bare .safetensors)."""
    path = Path(source)
    if path.is_file():
        return 0.0 if path.suffix in (".pt", ".pth") else None
    if (path / "model_index.json").is_file():
        return 1.0
    folders = [path, path.parent.parent] if path.parent.name == "checkpoints" else [path]
    for folder in folders:
        for name in (IMPORTED_CONFIG, "config.json"):
            f = folder / name
            if not f.is_file():
                continue
            data = json.loads(f.read_text())
            if "_class_name" in data:
                return 1.0
            if isinstance(data.get("dit_kwargs"), dict):
                return float(data["dit_kwargs"].get("timestep_freq_shift", 0.0))
            model = data.get("model")
            if isinstance(model, dict) and "name" in model:
                return float(model.get("timestep_freq_shift") or 0.0)
    return None

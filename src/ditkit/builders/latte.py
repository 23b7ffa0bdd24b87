"""Constructor arguments of Latte, the video DiT (``models/latte.py``), from a config."""

from __future__ import annotations

from typing import Any

from ditkit.config import DEFAULT_NUM_FRAMES, Config, ConfigError
from ditkit.models.latte import LATTE_PRESETS
from ditkit.registry import MODEL_BUILDERS

__all__ = ["latte_kwargs"]

# ModelConfig fields a Latte takes (pos_embed and time_conditioning are image- or text-only).
_LATTE_MODEL_FIELDS = (
    "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "qk_norm", "norm", "mlp",
    "grad_checkpointing", "timestep_freq_shift", "attention", "tubelet_size",
)


@MODEL_BUILDERS.register("latte")
def latte_kwargs(cfg: Config) -> dict[str, Any]:
    """``Latte(**kwargs)`` for a video config: the preset, then non-None ``cfg.model`` fields, then
    what the data decides (``input_size`` = ``data.image_size``, ``num_frames`` = ``data.num_frames``
    (default 8), ``in_channels``, ``num_classes``) and the objective (``learn_sigma``). The frame
    count and size are nominal: the position tables are computed per call. Raises ``ConfigError``
    when the frame size is not a whole number of patches, the frames not of tubelets, or the
    widths do not divide."""
    m, d = cfg.model, cfg.data
    kwargs = dict(LATTE_PRESETS[m.name])
    kwargs.update({k: getattr(m, k) for k in _LATTE_MODEL_FIELDS if getattr(m, k) is not None})
    for name in ("pos_embed", "time_conditioning"):
        if getattr(m, name) is not None:
            raise ConfigError(f"model.{name} is not an option of {m.name}: drop it")
    if d.latent_channels:
        raise ConfigError(f"{m.name} trains on pixels here (latent video is not wired yet): drop --vae")
    patch, frames = kwargs["patch_size"], d.num_frames or DEFAULT_NUM_FRAMES
    if d.image_size % patch:
        lower = d.image_size // patch * patch
        raise ConfigError(
            f"--image-size {d.image_size} is not divisible by the patch size {patch} of {m.name}: "
            f"use --image-size {lower or patch} or {lower + patch}"
        )
    tubelet = kwargs.get("tubelet_size", 1)
    if frames % tubelet:
        raise ConfigError(f"data.num_frames={frames} is not divisible by model.tubelet_size={tubelet}: use a multiple")
    if kwargs.get("attention", "interleaved") == "interleaved" and kwargs["depth"] % 2:
        raise ConfigError(f"model.depth={kwargs['depth']}: interleaved attention pairs spatial and temporal blocks, use an even depth")
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(f"model.hidden_size={kwargs['hidden_size']} is not divisible by model.num_heads={kwargs['num_heads']}")
    if d.channels is None or d.num_classes is None:
        raise ConfigError("data.channels and data.num_classes must be known to build the model (set by training)")
    kwargs.update(
        input_size=d.image_size,
        num_frames=frames,
        in_channels=d.channels,
        num_classes=d.num_classes,
        learn_sigma=cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma,
    )
    return kwargs

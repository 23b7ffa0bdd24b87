"""Constructor arguments of the image DiT (``models/dit.py``) from a config."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ditkit.config import Config, ConfigError
from ditkit.models.dit import DIT_PRESETS
from ditkit.registry import MODEL_BUILDERS

__all__ = ["dit_kwargs", "model_input_shape"]

# ModelConfig fields that are text-only (TextDiT); an image DiT does not take them.
_NOT_DIT = ("time_conditioning",)


def model_input_shape(cfg: Config) -> tuple[Optional[int], int]:
    """``(channels, side)`` of what an image network sees: the images, or the VAE latents of a
    latent model (``data.latent_channels`` set by ``--vae`` training or by ``import-dit``)."""
    d = cfg.data
    if d.latent_channels:
        return d.latent_channels, d.image_size // (d.vae_downsample or 1)
    return d.channels, d.image_size


@MODEL_BUILDERS.register("dit")
def dit_kwargs(cfg: Config) -> dict[str, Any]:
    """``DiT(**kwargs)`` for a config: preset values, then non-None ``cfg.model`` fields, then the
    sizes the data and objective decide (``input_size``, ``in_channels``, ``num_classes``,
    ``learn_sigma``). Raises ``ConfigError`` for impossible sizes."""
    m = cfg.model
    kwargs = dict(DIT_PRESETS[m.name])
    kwargs.update({k: v for k, v in dataclasses.asdict(m).items() if k != "name" and k not in _NOT_DIT and v is not None})
    patch = kwargs["patch_size"]
    in_channels, input_size = model_input_shape(cfg)
    if input_size % patch:
        unit = patch * (cfg.data.vae_downsample or 1) if cfg.data.latent_channels else patch
        lower = cfg.data.image_size // unit * unit
        raise ConfigError(
            f"--image-size {cfg.data.image_size} is not divisible by the patch size {patch} of {m.name}"
            + (f" times the VAE downsampling {cfg.data.vae_downsample}" if cfg.data.latent_channels else "")
            + f": use --image-size {lower or unit} or {lower + unit}, or a model with a smaller patch"
        )
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(
            f"model.hidden_size={kwargs['hidden_size']} is not divisible by model.num_heads={kwargs['num_heads']}"
        )
    if cfg.data.channels is None or cfg.data.num_classes is None:
        raise ConfigError("data.channels and data.num_classes must be known to build the model (set by training)")
    kwargs.update(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=cfg.data.num_classes,
        learn_sigma=cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma,
    )
    return kwargs

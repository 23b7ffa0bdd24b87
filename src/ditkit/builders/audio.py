"""Constructor arguments of the audio DiT (``models/audio_dit.py``) from a config."""

from __future__ import annotations

import warnings
from typing import Any

from ditkit.config import Config, ConfigError
from ditkit.models.audio_dit import AUDIO_DIT_PRESETS
from ditkit.registry import MODEL_BUILDERS

__all__ = ["audio_dit_kwargs", "mel_frames"]

# ModelConfig fields an AudioDiT takes (the others are image- or text-only).
_AUDIO_MODEL_FIELDS = (
    "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "qk_norm", "norm", "mlp",
    "grad_checkpointing",
)


def mel_frames(cfg: Config, seconds: float) -> int:
    """Spectrogram frames of a clip of ``seconds`` at the run's settings (``samples // hop_length``,
    as ``ditkit.data.audio.MelSpec.num_frames``)."""
    return int(round(seconds * cfg.data.sample_rate)) // cfg.data.hop_length


@MODEL_BUILDERS.register("audio_dit")
def audio_dit_kwargs(cfg: Config) -> dict[str, Any]:
    """``AudioDiT(**kwargs)`` for an audio config: the preset, then non-None ``cfg.model`` fields,
    then what the data decides (``n_mels``, ``num_classes``, ``frames_per_second``) and the
    objective (``learn_sigma``). Raises ``ConfigError`` when the clip length is not a whole number
    of patches or the widths do not divide."""
    m, d = cfg.model, cfg.data
    kwargs = dict(AUDIO_DIT_PRESETS[m.name])
    kwargs.update({k: getattr(m, k) for k in _AUDIO_MODEL_FIELDS if getattr(m, k) is not None})
    for name in ("pos_embed", "timestep_freq_shift", "time_conditioning"):
        if getattr(m, name) is not None:
            raise ConfigError(f"model.{name} is not an option of {m.name}: drop it")
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(f"model.hidden_size={kwargs['hidden_size']} is not divisible by model.num_heads={kwargs['num_heads']}")
    patch, frames = kwargs["patch_size"], mel_frames(cfg, d.duration)
    if frames % patch:
        step = patch * d.hop_length / d.sample_rate
        lower = frames // patch * patch * d.hop_length / d.sample_rate
        raise ConfigError(
            f"--duration {d.duration} s gives {frames} spectrogram frames, not a multiple of the patch size {patch} "
            f"of {m.name}: use a duration that is a multiple of {step:g} s (e.g. {lower or step:g} or {lower + step:g})"
        )
    if d.n_mels * patch > kwargs["hidden_size"]:
        # the network must pass the noise through at high t: a token wider than the model loses part of it
        warnings.warn(
            f"{m.name}: a token holds {patch} frames x {d.n_mels} mel bins = {d.n_mels * patch} numbers, more than the "
            f"width {kwargs['hidden_size']}; the model cannot reproduce its input and will sample noise: use a smaller "
            "patch_size or a larger hidden_size", stacklevel=2,
        )
    if d.num_classes is None:
        raise ConfigError("data.num_classes must be known to build the model (set by training)")
    kwargs.update(
        n_mels=d.n_mels,
        num_classes=d.num_classes,
        frames_per_second=d.sample_rate / d.hop_length,
        learn_sigma=cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma,
    )
    return kwargs

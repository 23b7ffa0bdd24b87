"""Constructor arguments of Latte, the video DiT (``models/latte.py``), and of its prompt variant
(``T2V-Latte-*``: ``models/prompt_dit.PromptDiT`` with a Latte backbone) from a config."""

from __future__ import annotations

import warnings
from typing import Any

from ditkit.builders.dit import model_input_shape
from ditkit.config import DEFAULT_NUM_FRAMES, Config, ConfigError
from ditkit.models.latte import LATTE_PRESETS, POS_EMBEDS, rope_head_problem
from ditkit.builders.prompt import caption_kwargs
from ditkit.models.prompt_dit import PROMPT_LATTE_PRESETS
from ditkit.registry import MODEL_BUILDERS

__all__ = ["latte_kwargs", "prompt_latte_kwargs"]

# ModelConfig fields a Latte takes (time_conditioning is text-only).
_LATTE_MODEL_FIELDS = (
    "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "qk_norm", "norm", "mlp",
    "grad_checkpointing", "timestep_freq_shift", "attention", "tubelet_size", "pos_embed",
)


@MODEL_BUILDERS.register("latte")
def latte_kwargs(cfg: Config) -> dict[str, Any]:
    """``Latte(**kwargs)`` for a video config: the preset, then non-None ``cfg.model`` fields, then
    what the data decides (``input_size`` = ``data.image_size``, or the latent side with ``--vae``:
    frames are encoded one by one through the image VAE; ``num_frames`` = ``data.num_frames``
    (default 8), ``in_channels``, ``num_classes``) and the objective (``learn_sigma``). The frame
    count and size are nominal: the position tables are computed per call. Raises ``ConfigError``
    when the frame size is not a whole number of patches, the frames not of tubelets, or the
    widths do not divide."""
    if cfg.data.channels is None or cfg.data.num_classes is None:
        raise ConfigError("data.channels and data.num_classes must be known to build the model (set by training)")
    kwargs = _clip_kwargs(cfg, dict(LATTE_PRESETS[cfg.model.name]))
    kwargs["num_classes"] = cfg.data.num_classes
    return kwargs


@MODEL_BUILDERS.register("prompt_latte")
def prompt_latte_kwargs(cfg: Config) -> dict[str, Any]:
    """``PromptDiT(backbone="latte", **kwargs)`` for a text-to-video config: Latte's arguments as
    ``latte_kwargs`` (no class labels), then the caption side as ``builders/prompt.py``: the joint
    encoder's vocabulary, ``data.max_caption_length`` and ``data.caption_dropout``, or with a frozen
    encoder (``data.text_encoder``) its width instead of an encoder. ConfigError as ``latte_kwargs``,
    and for a dropout outside [0, 1] or a caption limit under 2 tokens."""
    d = cfg.data
    if d.channels is None:
        raise ConfigError("data.channels must be known to build the model (set by training)")
    preset = dict(PROMPT_LATTE_PRESETS[cfg.model.name])
    kwargs = _clip_kwargs(cfg, preset)
    if kwargs.pop("class_dropout_prob", None) is not None:  # captions drop to the empty one instead
        warnings.warn(f"model.class_dropout_prob is not used by {cfg.model.name} (no class labels): captions drop to "
                      f"the empty prompt at data.caption_dropout={d.caption_dropout}", stacklevel=2)
    kwargs.update(caption_kwargs(cfg))
    return kwargs


def _clip_kwargs(cfg: Config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A Latte preset's arguments updated with non-None ``cfg.model`` fields and the sizes the data
    and objective decide (all but the classes); ConfigError for sizes that do not divide."""
    m, d = cfg.model, cfg.data
    kwargs.update({k: getattr(m, k) for k in _LATTE_MODEL_FIELDS if getattr(m, k) is not None})
    if m.time_conditioning is not None:
        raise ConfigError(f"model.time_conditioning is not an option of {m.name}: drop it")
    if m.pos_embed is not None and m.pos_embed not in POS_EMBEDS:
        raise ConfigError(f"model.pos_embed={m.pos_embed!r}: {m.name} takes {' or '.join(POS_EMBEDS)}")
    patch, frames = kwargs["patch_size"], d.num_frames or DEFAULT_NUM_FRAMES
    channels, side = model_input_shape(cfg)  # pixels, or per-frame VAE latents (--vae)
    if side % patch or (d.latent_channels and d.image_size % (d.vae_downsample or 1)):
        unit = patch * (d.vae_downsample or 1) if d.latent_channels else patch
        lower = d.image_size // unit * unit
        raise ConfigError(
            f"--image-size {d.image_size} is not divisible by the patch size {patch} of {m.name}"
            + (f" times the VAE downsampling {d.vae_downsample}" if d.latent_channels else "")
            + f": use --image-size {lower or unit} or {lower + unit}"
        )
    tubelet = kwargs.get("tubelet_size", 1)
    if frames % tubelet:
        raise ConfigError(f"data.num_frames={frames} is not divisible by model.tubelet_size={tubelet}: use a multiple")
    if kwargs.get("attention", "interleaved") == "interleaved" and kwargs["depth"] % 2:
        raise ConfigError(f"model.depth={kwargs['depth']}: interleaved attention pairs spatial and temporal blocks, use an even depth")
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(f"model.hidden_size={kwargs['hidden_size']} is not divisible by model.num_heads={kwargs['num_heads']}")
    if kwargs.get("pos_embed") == "rope":
        problem = rope_head_problem(kwargs["hidden_size"], kwargs["num_heads"], kwargs.get("attention", "interleaved"))
        if problem:
            raise ConfigError(f"model.pos_embed=rope with {m.name}: {problem}")
    kwargs.update(
        input_size=side,
        num_frames=frames,
        in_channels=channels,
        learn_sigma=cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma,
    )
    return kwargs

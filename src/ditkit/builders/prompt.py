"""Constructor arguments of the text-to-image network (``models/prompt_dit.py``) from a config.

The caption tokenizer is chosen by the data section (``data.caption_tokenizer``,
``ditkit.data.captions.caption_tokenizer``): the grammar's words for ``shapes_captions`` and UTF-8
bytes fit in the encoder's ``PROMPT_VOCAB_SIZE`` (259) ids; a word vocabulary fitted on the training
captions has the ``data.caption_vocab_size`` ids training recorded (the tokenizer itself is saved
beside every checkpoint as ``text_tokenizer.json``). All use ``[PAD]`` 0 and ``[BOS]`` 2.

With a frozen pretrained encoder (``data.text_encoder``, ``--text-encoder PATH``) the network holds no
text encoder: the DiT's caption projection takes ``data.text_encoder_dim`` channels (recorded by
training; read from the folder's ``config.json`` before that, which also checks the folder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ditkit.builders.dit import model_input_shape
from ditkit.config import Config, ConfigError
from ditkit.models.prompt_dit import BACKBONE_FIELDS, PROMPT_DIT_PRESETS, PROMPT_VOCAB_SIZE
from ditkit.registry import MODEL_BUILDERS

__all__ = ["prompt_dit_kwargs", "is_prompt_config", "caption_kwargs"]


def is_prompt_config(cfg: Config) -> bool:
    """Whether ``cfg.model`` names a text-to-image preset (``T2I-*``)."""
    return cfg.model.name in PROMPT_DIT_PRESETS


@MODEL_BUILDERS.register("prompt_dit")
def prompt_dit_kwargs(cfg: Config) -> dict[str, Any]:
    """``PromptDiT(**kwargs)``: the preset, then non-None backbone fields of ``cfg.model``, then the
    sizes the data, tokenizer and objective decide. ConfigError for impossible sizes."""
    m, d = cfg.model, cfg.data
    kwargs = dict(PROMPT_DIT_PRESETS[m.name])
    given = dataclasses.asdict(m)
    kwargs.update({k: given[k] for k in BACKBONE_FIELDS if given.get(k) is not None})
    in_channels, input_size = model_input_shape(cfg)
    if input_size % kwargs["patch_size"]:
        raise ConfigError(f"--image-size {d.image_size} is not divisible by the patch size {kwargs['patch_size']} of "
                          f"{m.name}: pick a multiple of {kwargs['patch_size']} or a model with a smaller patch")
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(f"model.hidden_size={kwargs['hidden_size']} is not divisible by model.num_heads={kwargs['num_heads']}")
    kwargs.update(
        input_size=input_size,
        in_channels=in_channels or 3,
        learn_sigma=cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma,
        **caption_kwargs(cfg),
    )
    return kwargs


def caption_kwargs(cfg: Config) -> dict[str, Any]:
    """The caption side of every prompt model (``PromptDiT``: images and video): the joint encoder's
    vocabulary, ``data.max_caption_length`` and ``data.caption_dropout``, or with a frozen encoder
    (``data.text_encoder``) no encoder and its states' width. ConfigError for a dropout outside
    [0, 1], a caption limit under 2 tokens or an unknown ``data.caption_tokenizer``."""
    from ditkit.data.captions import caption_tokenizer_kind

    d = cfg.data
    caption_tokenizer_kind(d)  # refuses an unknown kind before any data is read
    if not 0.0 <= d.caption_dropout <= 1.0:
        raise ConfigError(f"data.caption_dropout={d.caption_dropout}: use a probability in [0, 1] (default 0.1)")
    if d.max_caption_length < 2:
        raise ConfigError(f"data.max_caption_length={d.max_caption_length}: needs at least 2 ([BOS] and one word)")
    kwargs: dict[str, Any] = dict(vocab_size=d.caption_vocab_size or PROMPT_VOCAB_SIZE, max_caption_length=d.max_caption_length,
                                  caption_dropout=d.caption_dropout)
    if getattr(d, "text_encoder", None):  # a frozen encoder outside the model: the backbone reads its states
        kwargs.update(text_encoder=None, caption_channels=d.text_encoder_dim or _folder_width(d.text_encoder))
    return kwargs


def _folder_width(path: str) -> int:
    """Width of a frozen encoder's states, read from its folder before training recorded it
    (``data.text_encoder_dim``); ConfigError naming ``--text-encoder`` for a missing or unusable folder."""
    from ditkit.data.captions import frozen_encoder_width

    return frozen_encoder_width(path)

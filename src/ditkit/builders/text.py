"""Constructor arguments of the token DiT (``models/text_dit.py``) from a text config."""

from __future__ import annotations

from typing import Any

from ditkit.config import Config, ConfigError
from ditkit.models.text_dit import TEXT_DIT_PRESETS
from ditkit.registry import MODEL_BUILDERS

__all__ = ["text_dit_kwargs"]

# ModelConfig fields a TextDiT takes (the others are image-only; config.validate refuses them).
_TEXT_MODEL_FIELDS = (
    "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "qk_norm", "norm", "mlp",
    "grad_checkpointing", "time_conditioning",
)


@MODEL_BUILDERS.register("text_dit")
def text_dit_kwargs(cfg: Config) -> dict[str, Any]:
    """``TextDiT(**kwargs)`` for a text config: the preset, then non-None ``cfg.model`` fields, then
    ``vocab_size`` / ``num_classes`` from the data section and ``causal`` from the objective."""
    m = cfg.model
    kwargs = dict(TEXT_DIT_PRESETS[m.name])
    kwargs.update({k: getattr(m, k) for k in _TEXT_MODEL_FIELDS if getattr(m, k) is not None})
    head = kwargs["hidden_size"] // kwargs["num_heads"]
    if kwargs["hidden_size"] % kwargs["num_heads"] or head % 2:
        raise ConfigError(
            f"model.hidden_size={kwargs['hidden_size']} / model.num_heads={kwargs['num_heads']} must give an even "
            "head size (rotary embeddings rotate pairs of channels)"
        )
    if cfg.data.vocab_size is None or cfg.data.num_classes is None:
        raise ConfigError("data.vocab_size and data.num_classes must be known to build a text model (set by training)")
    kwargs.update(
        vocab_size=cfg.data.vocab_size,
        num_classes=cfg.data.num_classes,
        causal=cfg.objective.kind == "autoregressive",
        max_seq_len=cfg.data.seq_len,
    )
    return kwargs

"""Text-to-image network: a text encoder and a prompt-conditioned DiT in one module.

    model(x (B, C, H, W), t (B,) float on the 0..1000 scale, y) -> (B, out_channels, H, W)

``y`` is either caption token ids ``(B, L)`` int64 padded with ``pad_id`` (what the trainer feeds:
the dataset's ``labels``), encoded here by the jointly trained ``TextEncoder``, or an already
encoded ``PromptCondition`` (a frozen encoder's states). So the model keeps the ``model(x, t, y)``
shape of the class-conditional DiT and the trainer needs no change.

Caption dropout (classifier-free guidance training, Ho & Salimans 2022): in training mode each row
of ``y`` is replaced by the empty caption ``[BOS]`` with probability ``caption_dropout`` (drawn from
torch's global RNG, as ``LabelEmbedder`` drops labels, so a resumed run draws the same). The null
prompt of guidance is therefore the encoded empty caption, and a negative prompt simply replaces it.

The backbone is the cross-attention DiT (PixArt-alpha, ``cross_dit.py``) or the joint-attention
MMDiT (SD3, ``mmdit.py``); presets ``T2I-<backbone preset>`` pair each backbone size with a text
encoder size. For video the backbone is Latte with cross-attention in its spatial blocks
(``latte.py``, Latte's text-to-video variant): presets ``T2V-Latte-<size>/<patch>``, clips
``(B, C, F, H, W)`` in and out, the family ``prompt_latte`` (modality video).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ditkit.errors import ConfigError
from ditkit.models.cross_dit import CROSS_DIT_PRESETS, CrossDiT
from ditkit.models.latte import LATTE_PRESETS, Latte
from ditkit.models.mmdit import MMDIT_PRESETS, MMDiT
from ditkit.models.text_encoder import TEXT_ENCODER_PRESETS, PromptCondition, TextEncoder
from ditkit.registry import MODEL_FAMILIES

__all__ = ["PromptDiT", "PROMPT_DIT_PRESETS", "PROMPT_LATTE_PRESETS", "BACKBONES", "PROMPT_VOCAB_SIZE"]

# Token ids of the caption tokenizers (``ditkit.data.captions``): [PAD] 0, [UNK] 1, [BOS] 2, then 256
# bytes or a fixed grammar's words: the encoder's embedding table has PROMPT_VOCAB_SIZE rows by default;
# a vocabulary fitted on the captions sets its own size (``data.caption_vocab_size``, builders/prompt.py).
PROMPT_VOCAB_SIZE = 259

BACKBONES: dict[str, type[nn.Module]] = {"cross_dit": CrossDiT, "mmdit": MMDiT, "latte": Latte}
_BACKBONE_PRESETS = {"cross_dit": CROSS_DIT_PRESETS, "mmdit": MMDIT_PRESETS}
# the backbone arguments a preset or the config may set (the rest come from the data / tokenizer)
BACKBONE_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "qk_norm", "norm", "mlp",
                   "pos_embed", "grad_checkpointing")


class PromptDiT(nn.Module):
    """Text encoder + prompt-conditioned DiT (see the module docstring).

    Args:
        backbone: "cross_dit" (PixArt-alpha), "mmdit" (SD3) or "latte" (video: clips (B, C, F, H, W)).
        input_size, in_channels, learn_sigma: as the DiT (from the data and objective).
        backbone_kwargs: further backbone constructor arguments (patch_size, hidden_size, depth, ...).
        vocab_size, pad_id, bos_id, max_caption_length: the caption tokenizer's ids and limit.
        text_encoder: a ``TEXT_ENCODER_PRESETS`` name (hidden size, depth, heads of the encoder), or
            None for a frozen pretrained encoder kept outside the model (``--text-encoder``): then
            ``y`` must be its ``PromptCondition`` and caption dropout happens where the batch is built
            (``ditkit.data.captions.CaptionConditionBatches``).
        caption_channels: D_text of the frozen encoder's states (only with ``text_encoder=None``).
        caption_dropout: probability of the empty caption per training row, in [0, 1].
    Raises ConfigError for an unknown backbone or encoder, or a dropout outside [0, 1].
    """

    def __init__(
        self,
        backbone: str = "cross_dit",
        input_size: int = 32,
        in_channels: int = 3,
        learn_sigma: bool = False,
        vocab_size: int = PROMPT_VOCAB_SIZE,
        pad_id: int = 0,
        bos_id: int = 2,
        max_caption_length: int = 32,
        text_encoder: Optional[str] = "TextEncoder-T",
        caption_dropout: float = 0.1,
        caption_channels: Optional[int] = None,
        **backbone_kwargs: Any,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(f"prompt backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
        if text_encoder is None and not caption_channels:
            raise ConfigError("a frozen text encoder (text_encoder=None) needs caption_channels, the width of its states")
        if text_encoder is not None and text_encoder not in TEXT_ENCODER_PRESETS:
            raise ConfigError(f"text encoder {text_encoder!r}: choose one of {', '.join(TEXT_ENCODER_PRESETS)}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ConfigError(f"data.caption_dropout={caption_dropout}: use a probability in [0, 1] (default 0.1)")
        self.backbone_name = backbone
        self.pad_id, self.bos_id, self.caption_dropout = pad_id, bos_id, caption_dropout
        self.text_encoder: Optional[TextEncoder] = None  # None: a frozen encoder outside the model
        if text_encoder is not None:
            self.text_encoder = TextEncoder(vocab_size, max_length=max_caption_length, pad_id=pad_id,
                                            **TEXT_ENCODER_PRESETS[text_encoder])
            caption_channels = self.text_encoder.output_dim
        kwargs = dict(input_size=input_size, in_channels=in_channels, learn_sigma=learn_sigma,
                      caption_channels=caption_channels, **backbone_kwargs)
        if backbone == "mmdit":
            kwargs["pooled_channels"] = None  # the masked mean of the encoder states
        if backbone == "latte":
            kwargs["num_classes"] = 0  # the caption conditions it, not a label
        self.dit = BACKBONES[backbone](**kwargs)
        self.in_channels, self.out_channels = self.dit.in_channels, self.dit.out_channels
        self.input_size = input_size

    def null_ids(self, batch: int, length: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """Token ids (batch, length) of the empty caption: [BOS] then padding."""
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long, device=device)
        ids[:, 0] = self.bos_id
        return ids

    def encode(self, input_ids: torch.Tensor) -> PromptCondition:
        """Caption ids (B, L) int64 -> PromptCondition (states (B, L, D_text), padding mask, pooled)."""
        if self.text_encoder is None:
            raise ValueError("this model reads a frozen text encoder's states: pass its PromptCondition, not token ids")
        return self.text_encoder(input_ids, input_ids != self.pad_id)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Union[torch.Tensor, PromptCondition]) -> torch.Tensor:
        if isinstance(y, PromptCondition):
            return self.dit(x, t, y)
        if y is None or y.ndim != 2 or y.dtype != torch.long:
            raise ValueError(f"PromptDiT expects caption token ids (B, L) int64 or a PromptCondition, got "
                             f"{None if y is None else (tuple(y.shape), y.dtype)}")
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.caption_dropout  # (B,)
            y = torch.where(drop[:, None], self.null_ids(y.shape[0], y.shape[1], y.device), y)
        return self.dit(x, t, self.encode(y))

    def cross_attention_modules(self) -> list[nn.Module]:
        """The cross-attention layers whose ``attention_store`` records word maps: one per block of
        the cross-attention DiT, one per spatial block of Latte (its tokens in (frame, patch) order);
        ConfigError for the MMDiT, which has joint attention instead."""
        if self.backbone_name not in ("cross_dit", "latte"):
            raise ConfigError(f"attention maps read the cross-attention of a T2I-CrossDiT or T2V-Latte model; this "
                              f"backbone is {self.backbone_name} (maps are not wired for it)")
        return [block.cross_attn for block in self.dit.blocks if getattr(block, "cross_attn", None) is not None]


def _encoder_for(hidden_size: int) -> str:
    """Text encoder size that goes with a backbone width."""
    if hidden_size <= 192:
        return "TextEncoder-T"
    return "TextEncoder-S" if hidden_size <= 768 else "TextEncoder-B"


PROMPT_DIT_PRESETS: dict[str, dict[str, Any]] = {
    f"T2I-{name}": dict(
        backbone=family,
        text_encoder=_encoder_for(dims["hidden_size"]),
        **{k: v for k, v in dims.items() if k in BACKBONE_FIELDS},
    )
    for family, presets in _BACKBONE_PRESETS.items()
    for name, dims in presets.items()
}
MODEL_FAMILIES.register("prompt_dit", presets=PROMPT_DIT_PRESETS, modality="image", pipeline="text_to_image")(PromptDiT)

PROMPT_LATTE_PRESETS: dict[str, dict[str, Any]] = {
    f"T2V-{name}": dict(backbone="latte", text_encoder=_encoder_for(dims["hidden_size"]), **dims)
    for name, dims in LATTE_PRESETS.items()
}
MODEL_FAMILIES.register("prompt_latte", presets=PROMPT_LATTE_PRESETS, modality="video", pipeline="text_to_video",
                        summary="Latte with cross-attention to a prompt (text-to-video)")(PromptDiT)

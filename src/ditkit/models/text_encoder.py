"""What prompt-conditioned models take (``PromptCondition``) and a small text encoder trained with them.

Conditioning stays outside the DiT: a text encoder turns token ids into per-token states plus a
padding mask, and the cross-attention DiT (``cross_dit.py``) or the MMDiT (``mmdit.py``) reads them:

    encoder(input_ids (B, L) int64, attention_mask (B, L) bool) -> PromptCondition
    dit(x (B, C, H, W), t (B,) float on the 0..1000 scale, cond: PromptCondition) -> (B, C_out, H, W)

The null prompt of classifier-free guidance is simply the encoded empty caption (its tokenizer
still emits the start token, so it has one real token); nothing in the DiT knows about dropout.

``TextEncoder`` is the zero-download default: token embedding, learned positions and a few
pre-norm Transformer layers (Vaswani et al. 2017; pre-norm as in GPT-2) with a key padding mask,
trained jointly with the DiT. Its tokenizer (word level, fitted on the captions) lives in
``ditkit.data.captions``; frozen pretrained encoders (Hugging Face folders) live there too because
``models/`` imports torch only.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ditkit.models.layers import Attention, Mlp, make_norm, masked_attention

__all__ = ["PromptCondition", "TextEncoder", "TEXT_ENCODER_PRESETS", "build_text_encoder", "masked_mean"]


class PromptCondition(NamedTuple):
    """Encoded prompts for a batch.

    encoder_hidden_states: (B, L, D_text) float, one state per token (padding rows are ignored).
    encoder_attention_mask: (B, L) bool, True = a real token, False = padding; None = all real.
        Integer 0/1 masks (the Hugging Face form) are accepted and read as ``!= 0``.
    pooled: (B, D_pool) float summary of each prompt (SD3 feeds it into adaLN), or None; the MMDiT
        then uses the masked mean of ``encoder_hidden_states``.
    """

    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None

    def mask(self) -> torch.Tensor:
        """The padding mask as (B, L) bool (all True when none was given)."""
        states = self.encoder_hidden_states
        if self.encoder_attention_mask is None:
            return torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return self.encoder_attention_mask.to(torch.bool)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptCondition":
        """Move to ``device``; cast the float tensors to ``dtype`` (the mask stays bool)."""
        cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
        mask = None if self.encoder_attention_mask is None else self.encoder_attention_mask.to(device)
        return PromptCondition(cast(self.encoder_hidden_states), mask, cast(self.pooled))

    @staticmethod
    def cat(conditions: Sequence["PromptCondition"]) -> "PromptCondition":
        """Concatenate along the batch, padding every part to the longest L (padding masked out),
        e.g. [cond, null] for one batched guidance forward."""
        length = max(c.encoder_hidden_states.shape[1] for c in conditions)
        states, masks = [], []
        for c in conditions:
            s, m = c.encoder_hidden_states, c.mask()
            pad = length - s.shape[1]
            states.append(torch.nn.functional.pad(s, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(m, (0, pad), value=False))
        pooled = None
        if all(c.pooled is not None for c in conditions):
            pooled = torch.cat([c.pooled for c in conditions])  # type: ignore[misc]
        elif any(c.pooled is not None for c in conditions):
            raise ValueError("PromptCondition.cat: either every part has `pooled` or none has")
        return PromptCondition(torch.cat(states), torch.cat(masks), pooled)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: states (B, L, D), mask (B, L) bool -> (B, D); zeros for an
    all-padding row."""
    weights = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class PaddedSelfAttention(Attention):
    """``layers.Attention`` (same parameters) with a key padding mask: x (B, L, D), mask (B, L)."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        out = masked_attention(q, k, v, key_padding_mask)  # (B, nh, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class EncoderBlock(nn.Module):
    """Pre-norm Transformer layer: x + attn(norm(x)), then x + mlp(norm(x)); x (B, L, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, norm: str, mlp: str):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, affine=True)
        self.attn = PaddedSelfAttention(hidden_size, num_heads, qk_norm=qk_norm, norm=norm)
        self.norm2 = make_norm(norm, hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, mlp_ratio, kind=mlp)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Small bidirectional Transformer text encoder trained jointly with the DiT.

    forward(input_ids (B, L) int64 in [0, vocab_size), attention_mask (B, L) bool/int, True = real
    token, or None) -> PromptCondition with states (B, L, hidden_size) (zeros at padding), the mask,
    and ``pooled`` (B, hidden_size), the masked mean of the states. L <= max_length (ValueError
    otherwise: the tokenizer truncates). Id ``pad_id`` is the padding token.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        max_length: int = 32,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        pad_id: int = 0,
    ):
        super().__init__()
        self.vocab_size, self.hidden_size, self.max_length, self.pad_id = vocab_size, hidden_size, max_length, pad_id
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, hidden_size))
        self.blocks = nn.ModuleList(
            EncoderBlock(hidden_size, num_heads, mlp_ratio, qk_norm, norm, mlp) for _ in range(depth)
        )
        self.norm_final = make_norm(norm, hidden_size, affine=True)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def output_dim(self) -> int:
        """D_text of the states it returns (the DiT's ``caption_channels``)."""
        return self.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PromptCondition:
        B, L = input_ids.shape
        if L > self.max_length:
            raise ValueError(f"{L} tokens exceed the text encoder's max_length {self.max_length}: truncate when tokenizing")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
        x = self.token_embedding(input_ids) + self.position_embedding[:, :L]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm_final(x) * mask.unsqueeze(-1).to(x.dtype)  # padding rows are zero
        return PromptCondition(x, mask, masked_mean(x, mask))


TEXT_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "TextEncoder-T": dict(hidden_size=64, depth=2, num_heads=4),
    "TextEncoder-S": dict(hidden_size=256, depth=4, num_heads=4),
    "TextEncoder-B": dict(hidden_size=512, depth=6, num_heads=8),
}


def build_text_encoder(name: str, vocab_size: int, **overrides: Any) -> TextEncoder:
    """Build a preset ("TextEncoder-S", ...) for a tokenizer of ``vocab_size`` ids."""
    if name not in TEXT_ENCODER_PRESETS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of: {', '.join(TEXT_ENCODER_PRESETS)}")
    return TextEncoder(vocab_size, **{**TEXT_ENCODER_PRESETS[name], **overrides})

"""Token Diffusion Transformer for discrete (masked) diffusion, and its causal twin for the AR baseline.

The backbone of MDLM (Sahoo et al. 2024: a DiT with rotary embeddings and adaLN) built from the
blocks of the image DiT. The model knows nothing about masking schedules:

    forward(tokens (B, L) int64, t (B,) float on the 0..1000 scale or None, y (B,) int64 or None)
        -> logits (B, L, vocab_size)

Token ids ``0 .. vocab_size - 1`` are real tokens; id ``vocab_size`` is the mask token (also used as
BOS by the autoregressive objective), embedded but never predicted: the output has no mask column,
which is the "zero masking probability" half of MDLM's SUBS parameterisation by construction.

With ``time_conditioning=False`` (the default; MDLM reports that dropping it costs nothing) the
model ignores ``t`` entirely, which lets the masked sampler reuse an output when no token changed.
Positions enter only through 1-D RoPE (Su et al. 2021): with learned absolute positions a trial
masked model stayed at the unigram entropy for over a thousand steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditkit.registry import MODEL_FAMILIES

from ditkit.models.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    init_adaln_zero,
    rope_1d,
    run_blocks,
)

__all__ = ["TextDiT", "TEXT_DIT_PRESETS", "build_text_dit", "text_forward_macs"]


class TextDiT(nn.Module):
    """Transformer over tokens with adaLN conditioning on (optional) time and (optional) label.

    Args:
        vocab_size: real tokens (separator included); the mask/BOS id is ``vocab_size``.
        hidden_size, depth, num_heads, mlp_ratio, qk_norm, norm, mlp: the backbone (as ``DiT``).
        num_classes: > 0 adds a label embedder with a null class ``num_classes`` (guidance).
        class_dropout_prob: labels dropped to the null class in training (classifier-free guidance).
        time_conditioning: embed ``t`` into the adaLN vector; off, ``t`` is ignored.
        causal: causal attention (the autoregressive baseline on the same backbone).
        max_seq_len: length of the cached RoPE table (longer inputs recompute it).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        time_conditioning: bool = False,
        causal: bool = False,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        max_seq_len: int = 1024,
        rope_theta: float = 10000.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden size {hidden_size} / {num_heads} heads must give an even head size for RoPE")
        self.vocab_size, self.mask_id = vocab_size, vocab_size
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_classes, self.time_conditioning, self.causal = num_classes, time_conditioning, causal
        self.grad_checkpointing, self.rope_theta = grad_checkpointing, rope_theta

        self.tok_embedder = nn.Embedding(vocab_size + 1, hidden_size)  # + mask / BOS
        self.t_embedder = TimestepEmbedder(hidden_size) if time_conditioning else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, vocab_size, norm=norm)
        cos, sin = rope_1d(max_seq_len, hidden_size // num_heads, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init (xavier Linear, adaLN-Zero, zero final layer: uniform logits at start);
        N(0, 0.02) token/label embeddings and timestep MLP, as the image DiT."""
        init_adaln_zero(self)
        nn.init.normal_(self.tok_embedder.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.t_embedder is not None:
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len <= self.rope_cos.shape[0]:
            return self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        cos, sin = rope_1d(seq_len, self.hidden_size // self.num_heads, self.rope_theta)
        return cos.to(device), sin.to(device)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"TextDiT expects int64 token ids (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        B, L = tokens.shape
        x = self.tok_embedder(tokens)  # (B, L, D)
        c = torch.zeros(B, self.hidden_size, device=x.device, dtype=x.dtype)  # adaLN vector (B, D)
        if self.t_embedder is not None:
            if t is None:
                raise ValueError("this TextDiT is time-conditioned: pass t (B,) on the 0..1000 scale")
            c = c + self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(f"this TextDiT is label-conditional: pass y (null class = {self.num_classes})")
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this TextDiT is unconditional (num_classes=0): pass y=None")
        rope = self._rope(L, x.device)
        x = run_blocks(self.blocks, x, c, self.grad_checkpointing, rope=rope, is_causal=self.causal)
        return self.final_layer(x, c)  # (B, L, vocab_size)


# ------------------------------------------------------------------------------------------------
# Presets: "T" for tests and quick CPU runs up to "B" (12 x 768, the MDLM/GPT-2 small backbone).
# ------------------------------------------------------------------------------------------------

TEXT_DIT_PRESETS: dict[str, dict[str, Any]] = {
    "TextDiT-T": dict(depth=4, hidden_size=128, num_heads=4),
    "TextDiT-XS": dict(depth=6, hidden_size=256, num_heads=4),
    "TextDiT-S": dict(depth=12, hidden_size=384, num_heads=6),
    "TextDiT-M": dict(depth=12, hidden_size=512, num_heads=8),
    "TextDiT-B": dict(depth=12, hidden_size=768, num_heads=12),
}


MODEL_FAMILIES.register("text_dit", presets=TEXT_DIT_PRESETS, modality="text")(TextDiT)


def build_text_dit(name: str, vocab_size: int, **overrides: Any) -> TextDiT:
    """Build a preset by name ("TextDiT-T", ..., "TextDiT-B"); overrides replace constructor arguments."""
    if name not in TEXT_DIT_PRESETS:
        raise ValueError(f"unknown text model {name!r}; choose one of: {', '.join(TEXT_DIT_PRESETS)}")
    return TextDiT(vocab_size=vocab_size, **{**TEXT_DIT_PRESETS[name], **overrides})


def text_forward_macs(model: TextDiT, seq_len: int) -> int:
    """Multiply-accumulates of one forward pass over one sequence (Linear layers and the two
    attention matmuls; causal attention is counted at full cost). Training costs ~3x this."""
    D, L, V = model.hidden_size, seq_len, model.vocab_size
    macs = 0 if model.t_embedder is None else model.t_embedder.mlp[0].in_features * D + D * D
    for block in model.blocks:
        macs += 6 * D * D + 4 * L * D * D + 2 * L * L * D
        macs += L * D * block.mlp.fc1.out_features + L * block.mlp.fc2.in_features * D
    return macs + 2 * D * D + L * D * V

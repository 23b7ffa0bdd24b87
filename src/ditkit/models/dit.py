"""Image Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Read top to bottom: positional embedding helpers, the model, presets, counting.
The model knows nothing about noise: forward(x, t, y) -> tensor, with t on the 0..1000 scale
(see docs/architecture.md). Parameter names match the official facebookresearch/DiT checkpoints.
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
    rope_2d,
    run_blocks,
)

# ------------------------------------------------------------------------------------------------
# 2-D sin-cos positional embedding (MAE, He et al. 2022), computed in float64.
# ------------------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) float64: [sin(pos * w), cos(pos * w)], w_i = 10000 ** (-2i / D)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) float64 table for row-major patches: first half of the channels
    from the column index, second half from the row index (the official DiT/MAE layout)."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden size divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) by a Conv2d with kernel = stride = patch size (timm key `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion Transformer over image patches with adaLN-Zero conditioning.

    forward(x (B, C, H, W), t (B,) float timestep on the 0..1000 scale, y (B,) int64 or None)
    -> (B, out_channels, H, W), out_channels = 2C with `learn_sigma` ([mean prediction, v]).
    num_classes = 0 builds an unconditional model (no label embedder; y must be None).
    `step_cache` (None, or a models.caching.StepCache set by the pipelines while sampling) runs the
    block stack in place of the plain loop.

    MaskDiT (Zheng et al. 2023, arXiv 2306.09305, sec. 3.1): `decoder_depth` > 0 adds that many
    blocks after the encoder `blocks`; `forward(..., keep=idx)` with `idx` (B, K) int64 patch indices
    (row-major, each row distinct) runs the encoder on those K tokens only, puts a learned
    `mask_token` at the other N - K positions, adds the position table again and runs the decoder
    on all N tokens, so the output is full-size. Without `keep` every token goes through both (how
    the model samples). Masking needs the decoder and the sin-cos table (not RoPE).
    """

    step_cache: Any = None

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        pos_embed: str = "sincos",
        grad_checkpointing: bool = False,
        timestep_freq_shift: float = 0.0,
        decoder_depth: int = 0,
    ):
        super().__init__()
        if decoder_depth < 0:
            raise ValueError(f"decoder_depth={decoder_depth}: use 0 (no decoder) or a positive block count")
        if input_size % patch_size:
            raise ValueError(
                f"image/latent size {input_size} is not divisible by patch size {patch_size}: "
                f"pick a size that is a multiple of {patch_size} or another patch size"
            )
        if pos_embed not in ("sincos", "rope"):
            raise ValueError(f"pos_embed={pos_embed!r}: choose 'sincos' or 'rope'")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.num_heads, self.grad_checkpointing = num_heads, grad_checkpointing
        self.use_rope = pos_embed == "rope"
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed table kept as a frozen Parameter so it is in the state dict, as in official DiT.
        num_patches = self.grid_size**2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp) for _ in range(depth)
        )
        # MaskDiT's decoder and mask token (absent with decoder_depth 0: official checkpoints load as before)
        self.decoder_blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp) for _ in range(decoder_depth)
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if decoder_depth else None
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels, norm=norm)
        if self.use_rope:
            cos, sin = rope_2d(self.grid_size, hidden_size // num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official DiT init: xavier Linear/Conv, N(0, 0.02) embeddings, adaLN-Zero."""
        init_adaln_zero(self)
        self.reset_pos_embed()
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def reset_pos_embed(self) -> None:
        """Fill `pos_embed` with the 2-D sin-cos table for the current grid (zeros with RoPE)."""
        with torch.no_grad():
            if self.use_rope:
                self.pos_embed.zero_()
            else:
                table = sincos_2d(self.pos_embed.shape[-1], self.grid_size)
                self.pos_embed.copy_(table.float().unsqueeze(0))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); token order row-major, per-token layout (p, p, C)."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size) or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DiT expects input (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        x = self.x_embedder(x)  # (B, N, D)
        if not self.use_rope:
            x = x + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: pass labels y (use num_classes for the null class)")
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this DiT is unconditional (num_classes=0): pass y=None")
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        if keep is not None:  # MaskDiT training: the encoder sees the kept tokens only
            if self.mask_token is None or self.use_rope:
                raise ValueError("token masking needs decoder blocks (model.decoder_depth > 0) and sin-cos positions")
            B, N, D = x.shape
            index = keep.to(x.device)[..., None].expand(-1, -1, D)  # (B, K, D)
            x = run_blocks(self.blocks, x.gather(1, index), c, self.grad_checkpointing)  # (B, K, D)
            x = self.mask_token.to(x.dtype).expand(B, N, D).scatter(1, index, x)  # (B, N, D)
        elif self.step_cache is not None:  # sampling-time reuse between steps (models/caching.py)
            x = self.step_cache(self.blocks, x, c, rope=rope)
        else:
            x = run_blocks(self.blocks, x, c, self.grad_checkpointing, rope=rope)
        if self.mask_token is not None:  # the decoder: every position, its place told again (MaskDiT)
            x = run_blocks(self.decoder_blocks, x + self.pos_embed.to(x.dtype), c, self.grad_checkpointing)
        x = self.final_layer(x, c)  # (B, N, p*p*out_channels)
        return self.unpatchify(x)


# ------------------------------------------------------------------------------------------------
# Presets: the twelve of the paper (Table 1) and small ones for CPU work.
# ------------------------------------------------------------------------------------------------

_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    # CPU-sized, not in the paper: XS for the built-in datasets, T for tests.
    "XS": dict(depth=6, hidden_size=192, num_heads=3),
    "T": dict(depth=4, hidden_size=64, num_heads=4),
}
DIT_PRESETS: dict[str, dict[str, Any]] = {
    f"DiT-{size}/{patch}": dict(patch_size=patch, **dims) for size, dims in _SIZES.items() for patch in (2, 4, 8)
}


MODEL_FAMILIES.register("dit", presets=DIT_PRESETS, modality="image")(DiT)


def build_dit(name: str, **overrides: Any) -> DiT:
    """Build a preset by name ("DiT-XL/2", ...); keyword overrides replace any constructor argument."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DIT_PRESETS)}")
    return DiT(**{**DIT_PRESETS[name], **overrides})


def count_params(model: nn.Module) -> int:
    """Number of parameters, frozen ones (pos_embed) included, as the DiT paper counts them."""
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: DiT) -> int:
    """Multiply-accumulates of one forward pass for one image (the unit the DiT paper calls
    "Gflops" in Table 1), counting every Linear/Conv and the two attention matmuls.
    Training costs about 3x this (forward + backward); FLOPs are 2x MACs."""
    D, N = model.pos_embed.shape[-1], model.grid_size**2
    p, C = model.patch_size, model.in_channels
    macs = N * p * p * C * D  # patch embedding
    macs += model.t_embedder.mlp[0].in_features * D + D * D  # timestep MLP
    for block in [*model.blocks, *model.decoder_blocks]:  # MaskDiT decoder blocks see every token too
        hidden = block.mlp.fc1.out_features
        macs += 6 * D * D  # adaLN modulation
        macs += N * D * 3 * D + N * D * D  # qkv and output projections
        macs += 2 * N * N * D  # q k^T and attn v
        macs += N * D * hidden + N * block.mlp.fc2.in_features * D  # MLP
    macs += 2 * D * D + N * D * p * p * model.out_channels  # final adaLN and linear
    return macs


def train_flops_per_image(model: DiT) -> int:
    """Analytic training FLOPs per image: 3 x forward (backward = 2 x forward), 2 FLOPs per MAC."""
    return 6 * forward_macs(model)


__all__ = [
    "DiT",
    "DIT_PRESETS",
    "build_dit",
    "count_params",
    "forward_macs",
    "train_flops_per_image",
    "sincos_2d",
]

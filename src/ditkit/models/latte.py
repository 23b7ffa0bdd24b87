"""Latte: a latent diffusion transformer for video (Ma et al. 2024, arXiv 2401.03048).

Read top to bottom: position tables, the space-time block, the model, presets, counting.
The model knows nothing about noise: forward(x, t, y) -> tensor with t on the 0..1000 scale
(docs/architecture.md), like the image DiT whose pieces it reuses.

Layout. A clip is ``(B, C, F, H, W)``: batch, channels, frames, height, width (the PyTorch
``Conv3d`` / torchvision video convention). The official Latte code takes ``(B, F, C, H, W)``;
permute with ``x.transpose(1, 2)`` when loading its tensors.

Variants (the paper's sec. 3.2 and an option from CogVideoX, Yang et al. 2024):

* ``attention="interleaved"`` (Latte variant 1, the paper's best): blocks alternate spatial
  attention (the tokens of one frame attend to each other) and temporal attention (the tokens at
  one spatial position attend across frames). ``depth`` counts both kinds (Latte-XL/2: 28 blocks,
  14 spatial + 14 temporal). The temporal position table is added before the first temporal
  block, as in Latte, so the spatial blocks see each frame exactly as an image DiT sees an image
  (Latte initialises them from an image DiT).
* ``attention="full"``: every block attends over all F x N space-time tokens; spatial and
  temporal position tables are both added at the input.

Tokens. ``tubelet_size=1`` embeds each frame's p x p patches (Latte's default); ``tubelet_size=k``
embeds k x p x p tubelets with a Conv3d (Latte's "compression frame patch embedding", ViViT) and
the output layer predicts all k frames of each token.

Sizes are not baked in: the sin-cos position tables are computed for the (F, H, W) of each call
(no weights depend on them), so a model trained on 8 frames of 32 x 32 runs on 16 frames or at
48 x 32. Positions past the trained range are extrapolated, not interpolated.

Positions. ``pos_embed="sincos"`` (Latte's) adds the tables above. ``pos_embed="rope"`` adds none
and rotates queries and keys instead (RoFormer, Su et al. 2021): 2-D axial RoPE over (row, column)
in the spatial blocks, 1-D over the frame index in the temporal blocks, 3-D axial (frame, row,
column) with full attention (as CogVideoX). Attention then depends on relative offsets only, the
same at every place. (On ``moving_digits``, where a digit may stand anywhere, it did not shorten
training at the CPU budget: docs/video.md.) Rotated tables are computed per call too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditkit.models.cross_dit import CaptionProjection
from ditkit.models.dit import DIT_PRESETS, PatchEmbed, sincos_1d
from ditkit.models.layers import (
    CrossAttention,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    init_adaln_zero,
    modulate,
    rope_axes,
)
from ditkit.models.text_encoder import PromptCondition
from ditkit.registry import MODEL_FAMILIES

ATTENTION_KINDS = ("interleaved", "full")
POS_EMBEDS = ("sincos", "rope")
Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (tokens of one attention run, head_dim // 2)


def rope_head_problem(hidden_size: int, num_heads: int, attention: str) -> str | None:
    """Why RoPE cannot rotate this head width, or None: it turns channel pairs, at least one pair per
    axis (two axes in the spatial blocks, three with full attention), so the width must be even and
    at least 4 (6 with full attention)."""
    head, least = hidden_size // num_heads, 6 if attention == "full" else 4
    if head % 2 or head < least:
        return (f"RoPE rotates channel pairs, at least one per axis: the head width hidden_size / num_heads = {head} "
                f"must be even and >= {least}")
    return None

# ------------------------------------------------------------------------------------------------
# Sin-cos position tables for any grid (MAE layout, as the image DiT), float64 -> cast by caller.
# ------------------------------------------------------------------------------------------------


def sincos_grid(embed_dim: int, height: int, width: int) -> torch.Tensor:
    """(height * width, embed_dim) float64 for row-major patches: the first half of the channels
    from the column index, the second half from the row index. Equals ``dit.sincos_2d`` when
    height == width, so spatial blocks see the positions an image DiT was trained with."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden size divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)


def sincos_frames(embed_dim: int, num_frames: int) -> torch.Tensor:
    """(num_frames, embed_dim) float64 temporal table, positions 0..num_frames-1 (Latte's temp_embed)."""
    return sincos_1d(embed_dim, torch.arange(num_frames))


# ------------------------------------------------------------------------------------------------
# The block: a DiT block whose attention runs within groups of tokens.
# ------------------------------------------------------------------------------------------------


class SpaceTimeBlock(DiTBlock):
    """DiT block (adaLN-Zero) over ``(B, G * L, D)`` tokens whose attention stays inside each of
    ``groups`` = G consecutive runs of L tokens; the MLP and modulation are per token.

    Spatial attention: tokens ordered (frame, patch), G = F. Temporal: ordered (patch, frame),
    G = N. Full 3-D: G = 1, the plain DiT block. The conditioning ``c`` is ``(B, D)``, one
    modulation per clip, which Latte computes once per frame or per patch instead (same values).

    ``cross_attention=True`` (prompt models) adds, after the self-attention, cross-attention from
    every token to the caption states ``context`` (B, L, D) with padding mask ``context_mask``
    (B, L) bool, ungated and unnormalised as in PixArt-alpha's block (whose text-to-video Latte
    variant puts it in the spatial blocks); its output projection starts at zero, so a new block
    is still the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, cross_attention: bool = False,
                 **options: Any):
        super().__init__(hidden_size, num_heads, mlp_ratio, **options)
        self.cross_attn = (CrossAttention(hidden_size, num_heads, qk_norm=options.get("qk_norm", False),
                                          norm=options.get("norm", "layernorm")) if cross_attention else None)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, c: torch.Tensor, groups: int = 1, context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None, rope: Rope | None = None,
    ) -> torch.Tensor:
        """``rope``: (cos, sin) of the T / groups tokens of one attention run, or None (sin-cos model)."""
        if groups == 1 and self.cross_attn is None:
            return super().forward(x, c, rope=rope)
        B, T, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa).reshape(B * groups, T // groups, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, rope=rope).reshape(B, T, D)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block cross-attends to a caption: pass its states (context)")
            x = x + self.cross_attn(x, context, context_mask)  # (B, T, D): every token reads the caption
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class Latte(nn.Module):
    """Video diffusion transformer with adaLN-Zero conditioning on timestep and class (or prompt).

    forward(x (B, C, F, H, W), t (B,) float timestep on the 0..1000 scale, y (B,) int64 or None)
    -> (B, out_channels, F, H, W), out_channels = 2C with ``learn_sigma`` ([mean prediction, v]).
    ``num_classes = 0`` builds an unconditional model (y must be None); the label ``num_classes``
    is the null class of classifier-free guidance, and in ``train()`` mode labels drop to it with
    probability ``class_dropout_prob`` (as DiT). ``caption_channels = D_text`` builds a prompt
    model instead (Latte's text-to-video variant; ``num_classes`` must be 0): ``y`` is a
    ``PromptCondition`` (encoder states (B, L, D_text) and padding mask), projected as PixArt-alpha
    does and read by cross-attention in the spatial blocks (every block with full attention);
    the text encoder and caption dropout live outside (``models/prompt_dit.PromptDiT``). ``input_size`` and ``num_frames`` are the nominal
    size (recorded, used by ``forward_macs``); any F divisible by ``tubelet_size`` and any H, W
    divisible by ``patch_size`` are accepted. Raises ``ValueError`` for other shapes.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_frames: int = 16,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attention: str = "interleaved",
        tubelet_size: int = 1,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        grad_checkpointing: bool = False,
        timestep_freq_shift: float = 0.0,
        caption_channels: int | None = None,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r}: choose one of {', '.join(POS_EMBEDS)}")
        problem = rope_head_problem(hidden_size, num_heads, attention) if pos_embed == "rope" else None
        if problem:
            raise ValueError(problem)
        if caption_channels and num_classes:
            raise ValueError(f"a prompt Latte (caption_channels={caption_channels}) takes no class labels: num_classes=0")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={attention!r}: choose one of {', '.join(ATTENTION_KINDS)}")
        if attention == "interleaved" and depth % 2:
            raise ValueError(f"interleaved attention pairs spatial and temporal blocks: depth {depth} must be even")
        if tubelet_size < 1:
            raise ValueError(f"tubelet_size must be >= 1, got {tubelet_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_frames, self.tubelet_size, self.attention = num_frames, tubelet_size, attention
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.use_rope = pos_embed == "rope"
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.grad_checkpointing = grad_checkpointing

        if tubelet_size == 1:  # per-frame patches; same keys and shapes as the image DiT's embedder
            self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        else:
            self.x_embedder = TubeletEmbed(tubelet_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.caption_channels = caption_channels
        self.caption_projection = CaptionProjection(caption_channels, hidden_size) if caption_channels else None
        reads_caption = [bool(caption_channels) and (attention == "full" or i % 2 == 0) for i in range(depth)]
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(hidden_size, num_heads, mlp_ratio, cross_attention=cross, qk_norm=qk_norm, norm=norm, mlp=mlp)
            for cross in reads_caption
        )
        out_per_token = tubelet_size * patch_size * patch_size * self.out_channels
        self.final_layer = FinalLayer(hidden_size, out_per_token, norm=norm)
        self._pos_cache: dict[tuple, tuple[Any, Any]] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT/Latte init: xavier Linear/Conv, N(0, 0.02) embeddings, adaLN-Zero (output zero)."""
        init_adaln_zero(self)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.caption_projection is not None:  # PixArt-alpha: N(0, 0.02) caption projection
            nn.init.normal_(self.caption_projection.fc1.weight, std=0.02)
            nn.init.normal_(self.caption_projection.fc2.weight, std=0.02)
        for block in self.blocks:  # cross-attention adds nothing at first (the block stays the identity)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)

    def position_tables(
        self, frames: int, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial (1, 1, h * w, D) and temporal (1, frames, 1, D) tables for a token grid of
        ``frames x height x width`` tokens, cached per size, device and dtype."""
        key = (frames, height, width, device, dtype)
        if key not in self._pos_cache:
            D = self.hidden_size
            # Plain tensors even when first asked under inference_mode (sampling during training).
            with torch.inference_mode(False), torch.no_grad():
                spatial = sincos_grid(D, height, width).to(device, dtype).view(1, 1, height * width, D)
                temporal = sincos_frames(D, frames).to(device, dtype).view(1, frames, 1, D)
            self._pos_cache[key] = (spatial, temporal)
        return self._pos_cache[key]

    def rope_tables(self, frames: int, height: int, width: int, device: torch.device) -> tuple[Rope, Rope]:
        """RoPE (cos, sin) for the two kinds of attention run, cached per size and device:
        interleaved: (spatial over the ``height x width`` tokens of a frame, 2-D axial with half the
        channel pairs for rows and half for columns; temporal over ``frames``, 1-D); full: (3-D axial
        over all ``frames x height x width`` tokens in (frame, row, column) order, ``3P // 8`` of the
        ``P`` pairs each for rows and columns and the rest for frames, twice)."""
        key = ("rope", frames, height, width, device)
        if key not in self._pos_cache:
            pairs = self.hidden_size // self.num_heads // 2
            rows, cols = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
            with torch.inference_mode(False), torch.no_grad():
                if self.attention == "full":  # one table serves every block
                    space = 3 * pairs // 8
                    axes = [torch.arange(frames).repeat_interleave(height * width), rows.repeat(frames), cols.repeat(frames)]
                    spatial = temporal = rope_axes(axes, [pairs - 2 * space, space, space])
                else:
                    spatial = rope_axes([rows, cols], [pairs // 2, pairs - pairs // 2])
                    temporal = rope_axes([torch.arange(frames)], [pairs])
            self._pos_cache[key] = tuple(tuple(t.to(device) for t in table) for table in (spatial, temporal))  # type: ignore[assignment]
        return self._pos_cache[key]  # type: ignore[return-value]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless x is (B, in_channels, F, H, W) with F divisible by the
        tubelet size and H, W by the patch size."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"Latte expects clips (B, {self.in_channels}, F, H, W), got {tuple(x.shape)}")
        F_, H, W = x.shape[2:]
        p, k = self.patch_size, self.tubelet_size
        if H % p or W % p:
            raise ValueError(f"frame size {H}x{W} is not divisible by patch size {p}: pick a multiple of {p}")
        if F_ % k:
            raise ValueError(f"{F_} frames are not divisible by tubelet size {k}: use a multiple of {k} frames")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> tokens (B, F', N, D), F' = F / tubelet_size, N = (H / p)(W / p)."""
        B, C, F_, H, W = x.shape
        if self.tubelet_size == 1:
            tokens = self.x_embedder(x.transpose(1, 2).reshape(B * F_, C, H, W))  # (B*F, N, D)
            return tokens.view(B, F_, -1, self.hidden_size)
        return self.x_embedder(x)

    def unpatchify(self, x: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
        """(B, F' * N, k*p*p*C_out) -> (B, C_out, F' * k, h * p, w * p); token order (frame, row,
        column), per-token layout (k, p, p, C_out)."""
        B, c, p, k = x.shape[0], self.out_channels, self.patch_size, self.tubelet_size
        x = x.reshape(B, frames, h, w, k, p, p, c)
        x = torch.einsum("bfhwkpqc->bcfkhpwq", x)
        return x.reshape(B, c, frames * k, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | PromptCondition | None = None) -> torch.Tensor:
        self.check_input(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.embed(x)  # (B, F', N, D)
        B, frames, N, D = tokens.shape
        if self.use_rope:  # rotated queries and keys instead of added tables
            spatial_rope, temporal_rope = self.rope_tables(frames, h, w, tokens.device)
            temporal_pos = None
        else:
            spatial_rope = temporal_rope = None
            spatial_pos, temporal_pos = self.position_tables(frames, h, w, tokens.device, tokens.dtype)
            tokens = tokens + spatial_pos
            if self.attention == "full":
                tokens = tokens + temporal_pos

        c = self.t_embedder(t)  # (B, D)
        context = context_mask = None
        if self.caption_projection is not None:
            if not isinstance(y, PromptCondition):
                raise ValueError("this Latte reads prompts: pass y as a PromptCondition (encoder states and mask)")
            context = self.caption_projection(y.encoder_hidden_states.to(tokens.dtype))  # (B, L, D)
            context_mask = y.mask()
        elif self.y_embedder is not None:
            if y is None:
                raise ValueError("this Latte is class-conditional: pass labels y (use num_classes for the null class)")
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this Latte is unconditional (num_classes=0): pass y=None")

        if self.attention == "full":
            out = tokens.reshape(B, frames * N, D)
            for i in range(len(self.blocks)):
                out = self._run(i, out, c, 1, context, context_mask, spatial_rope)
        else:
            out = tokens.reshape(B, frames * N, D)  # (frame, patch) order
            for i in range(0, len(self.blocks), 2):
                out = self._run(i, out, c, frames, context, context_mask, spatial_rope)  # spatial: within each frame
                out = out.view(B, frames, N, D).transpose(1, 2)  # (B, N, F', D): (patch, frame) order
                if i == 0 and temporal_pos is not None:
                    out = out + temporal_pos.transpose(1, 2)  # (1, 1, F', D): Latte adds it here once
                out = self._run(i + 1, out.reshape(B, N * frames, D), c, N, rope=temporal_rope)  # temporal
                out = out.view(B, N, frames, D).transpose(1, 2).reshape(B, frames * N, D)
        out = self.final_layer(out, c)  # (B, F' * N, k*p*p*C_out)
        return self.unpatchify(out, frames, h, w)

    def _run(self, index: int, x: torch.Tensor, c: torch.Tensor, groups: int, context: torch.Tensor | None = None,
             context_mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        """Block ``index`` on x (B, T, D), with activation checkpointing when asked (training only);
        ``context`` / ``context_mask``: the projected caption, for the blocks that read it; ``rope``:
        the rotation tables of this block's attention runs (RoPE models)."""
        block = self.blocks[index]
        if block.cross_attn is None:
            context = context_mask = None
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, groups, context, context_mask, rope, use_reentrant=False)
        return block(x, c, groups, context, context_mask, rope)


class TubeletEmbed(nn.Module):
    """(B, C, F, H, W) -> (B, F / k, N, D) by a Conv3d with kernel = stride = (k, p, p)."""

    def __init__(self, tubelet_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, F/k, h, w)
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, F/k, h*w, D)


# ------------------------------------------------------------------------------------------------
# Presets: the paper's four sizes (Latte Table 1: same widths and depths as DiT's S/B/L/XL, depth
# counting spatial + temporal blocks) and DiT's CPU sizes (XS, T), each at patch 2, 4 and 8.
# ------------------------------------------------------------------------------------------------

LATTE_PRESETS: dict[str, dict[str, Any]] = {
    name.replace("DiT-", "Latte-"): dict(preset) for name, preset in DIT_PRESETS.items()
}


def build_latte(name: str, **overrides: Any) -> Latte:
    """Build a preset by name ("Latte-XL/2", "Latte-T/4", ...); keyword overrides replace any
    constructor argument. Raises ``ValueError`` for an unknown name."""
    if name not in LATTE_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(LATTE_PRESETS)}")
    return Latte(**{**LATTE_PRESETS[name], **overrides})


def latte_forward_macs(model: Latte, num_frames: int | None = None, input_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass for one clip of ``num_frames`` x ``input_size``^2
    (defaults: the model's nominal size), counting every Linear/Conv and the attention matmuls.
    Interleaved attention costs 2 N F'(N + F') D per block pair in its matmuls, full attention
    2 (N F')^2 D per block: the term that makes full 3-D attention grow with the square of frames."""
    frames = (num_frames or model.num_frames) // model.tubelet_size
    n = ((input_size or model.input_size) // model.patch_size) ** 2
    D, T = model.hidden_size, frames * n
    macs = T * model.x_embedder.proj.weight[0].numel() * D  # patch / tubelet embedding
    macs += model.t_embedder.mlp[0].in_features * D + D * D  # timestep MLP
    for i, block in enumerate(model.blocks):
        hidden = block.mlp.fc1.out_features
        macs += 6 * D * D + T * 4 * D * D  # adaLN; qkv and output projections
        macs += T * D * hidden + T * block.mlp.fc2.in_features * D  # MLP
        if model.attention == "full":
            macs += 2 * T * T * D
        else:  # even blocks attend within a frame (n tokens), odd ones along time (frames tokens)
            macs += 2 * T * (n if i % 2 == 0 else frames) * D
    macs += 2 * D * D + T * D * model.final_layer.linear.out_features  # final adaLN and linear
    return macs


MODEL_FAMILIES.register(
    "latte", presets=LATTE_PRESETS, modality="video",
    summary="Latte video DiT (Ma et al. 2024): interleaved spatial/temporal or full 3-D attention",
)(Latte)

__all__ = [
    "Latte",
    "LATTE_PRESETS",
    "ATTENTION_KINDS",
    "SpaceTimeBlock",
    "TubeletEmbed",
    "build_latte",
    "latte_forward_macs",
    "sincos_grid",
    "sincos_frames",
]

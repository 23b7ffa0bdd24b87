"""Joint-attention Diffusion Transformer (MMDiT) as in Stable Diffusion 3 (Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv 2403.03206, Fig. 2).

Read top to bottom: joint attention, block, model, presets.

Text and image tokens keep separate weights (QKV, output projection, MLP, adaLN modulation: two
"streams") but meet in one attention over the concatenated sequence [image tokens, text tokens],
so each stream reads the other. The adaLN vector is the timestep embedding plus an embedding of the
pooled text (sec. 5.2: pooled CLIP in SD3; here ``cond.pooled`` or the masked mean of the text
states). Queries and keys are RMS-normalised per head (QK-norm, sec. 5.3.2). The last block only
reads the text stream (its text output would be discarded, so it has no text MLP nor text output
projection: the ``context_pre_only`` block of the SD3 release), which makes the parameter count
equal to diffusers' ``SD3Transformer2DModel`` of the same size (tested).

    forward(x (B, C, H, W), t (B,) float timestep on the 0..1000 scale, cond: PromptCondition)
        -> (B, out_channels, H, W)

Caption padding (``cond.encoder_attention_mask`` False) is masked out of the joint attention as a
key and out of the pooled mean, so it never changes the output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditkit.errors import ConfigError
from ditkit.models.cross_dit import convert_state_dict
from ditkit.models.dit import PatchEmbed, sincos_2d
from ditkit.models.layers import (
    FinalLayer,
    Mlp,
    RMSNorm,
    TimestepEmbedder,
    apply_rope,
    make_norm,
    masked_attention,
    modulate,
    rope_2d,
)
from ditkit.models.text_encoder import PromptCondition, masked_mean
from ditkit.registry import MODEL_FAMILIES

__all__ = ["MMDiT", "MMDIT_PRESETS", "build_mmdit", "diffusers_config", "to_diffusers_state_dict", "from_diffusers_state_dict"]


class JointAttention(nn.Module):
    """One attention over [image (B, N, D), text (B, L, D)] with per-stream QKV and output weights.

    Returns the image part (B, N, D) and the text part (B, L, D), or None for the text part when
    ``context_pre_only`` (the last block). ``text_mask`` (B, L) bool, True = real token.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, context_pre_only: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.context_qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda: RMSNorm(self.head_dim)) if qk_norm else nn.Identity  # noqa: E731
        self.q_norm, self.k_norm, self.context_q_norm, self.context_k_norm = norm(), norm(), norm(), norm()
        self.proj = nn.Linear(dim, dim)
        self.context_proj = None if context_pre_only else nn.Linear(dim, dim)

    def _heads(self, linear: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, N, _ = x.shape
        return linear(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd) x3

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        text_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        L = context.shape[1]
        q, k, v = self._heads(self.qkv, x)
        cq, ck, cv = self._heads(self.context_qkv, context)
        q, k, cq, ck = self.q_norm(q), self.k_norm(k), self.context_q_norm(cq), self.context_k_norm(ck)
        if rope is not None:  # 2-D RoPE on the image tokens; text tokens stay unrotated (position 0)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keep = torch.cat([torch.ones(B, N, dtype=torch.bool, device=x.device), text_mask], dim=1)  # (B, N + L)
        out = masked_attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), keep)
        out = out.transpose(1, 2).reshape(B, N + L, D)  # (B, N + L, D)
        image, text = out.split([N, L], dim=1)
        return self.proj(image), None if self.context_proj is None else self.context_proj(text)


class MMDiTBlock(nn.Module):
    """Two-stream block (SD3 Fig. 2b): x (B, N, D), context (B, L, D), c (B, D) -> (x, context).

    Each stream: adaLN-Zero modulated joint attention, then its own modulated MLP. With
    ``context_pre_only`` the text stream only feeds the attention and ``context`` comes back None.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
        norm: str = "layernorm", mlp: str = "gelu", context_pre_only: bool = False,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = make_norm(norm, hidden_size, affine=False)
        self.context_norm1 = make_norm(norm, hidden_size, affine=False)
        self.attn = JointAttention(hidden_size, num_heads, qk_norm=qk_norm, context_pre_only=context_pre_only)
        self.norm2 = make_norm(norm, hidden_size, affine=False)
        self.mlp = Mlp(hidden_size, mlp_ratio, kind=mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        n_context = 2 if context_pre_only else 6  # the last block's text stream: shift, scale only
        self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_context * hidden_size))
        if not context_pre_only:
            self.context_norm2 = make_norm(norm, hidden_size, affine=False)
            self.context_mlp = Mlp(hidden_size, mlp_ratio, kind=mlp)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        c: torch.Tensor,
        text_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        mods = self.context_adaLN_modulation(c).chunk(2 if self.context_pre_only else 6, dim=1)
        attn, context_attn = self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), modulate(self.context_norm1(context), mods[0], mods[1]),
            text_mask, rope=rope,
        )
        x = x + gate_msa.unsqueeze(1) * attn
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mods
        context = context + c_gate_msa.unsqueeze(1) * context_attn
        context = context + c_gate_mlp.unsqueeze(1) * self.context_mlp(
            modulate(self.context_norm2(context), c_shift_mlp, c_scale_mlp)
        )
        return x, context


class PooledEmbedder(nn.Module):
    """Pooled text (B, pooled_channels) -> (B, D): Linear, SiLU, Linear (SD3's text_embedder)."""

    def __init__(self, pooled_channels: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(pooled_channels, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(pooled)))


class MMDiT(nn.Module):
    """Joint-attention DiT (SD3 MMDiT).

    Args (as ``DiT`` where shared): input_size, patch_size, in_channels, hidden_size, depth,
        num_heads, mlp_ratio, learn_sigma (default False: SD3 is trained with rectified flow).
        caption_channels: D_text of ``cond.encoder_hidden_states`` (4096 for T5-XXL in SD3).
        pooled_channels: size of ``cond.pooled`` (2048 for SD3's two pooled CLIPs); None = the
            caption channels (the masked mean of the states is used when ``cond.pooled`` is None).
        qk_norm: RMSNorm on queries and keys per head (default on, SD3 sec. 5.3.2).
        norm, mlp: block norm ("layernorm" | "rmsnorm") and MLP ("gelu" | "swiglu").
        pos_embed: "sincos" (absolute table on the image tokens) or "rope" (2-D RoPE on image q/k).
        grad_checkpointing: recompute block activations in backward (training memory).
    """

    def __init__(
        self,
        input_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        pooled_channels: int | None = 2048,
        learn_sigma: bool = False,
        qk_norm: bool = True,
        norm: str = "layernorm",
        mlp: str = "gelu",
        pos_embed: str = "sincos",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(
                f"image/latent size {input_size} is not divisible by patch size {patch_size}: "
                f"pick a size that is a multiple of {patch_size} or another patch size"
            )
        if pos_embed not in ("sincos", "rope"):
            raise ConfigError(f"pos_embed={pos_embed!r}: choose 'sincos' or 'rope'")
        if depth < 1:
            raise ConfigError(f"MMDiT depth must be >= 1, got {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.caption_channels = hidden_size, num_heads, caption_channels
        self.options = dict(qk_norm=qk_norm, norm=norm, mlp=mlp, pos_embed=pos_embed, mlp_ratio=mlp_ratio)
        self.pooled_channels = pooled_channels or caption_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grad_checkpointing = grad_checkpointing
        self.use_rope = pos_embed == "rope"
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.pooled_embedder = PooledEmbedder(self.pooled_channels, hidden_size)
        self.context_embedder = nn.Linear(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(
            MMDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp,
                       context_pre_only=i == depth - 1)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels, norm=norm)
        if self.use_rope:
            cos, sin = rope_2d(self.grid_size, hidden_size // num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid_size).float().unsqueeze(0), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linear/Conv, N(0, 0.02) timestep MLP, zero adaLN modulation (every
        block starts as the identity) and zero final Linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (MMDiTBlock, FinalLayer)):
                for seq in (m.adaLN_modulation, getattr(m, "context_adaLN_modulation", None)):
                    if seq is not None:
                        nn.init.zeros_(seq[-1].weight)
                        nn.init.zeros_(seq[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); row-major tokens, per-token layout (p, p, C)."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptCondition) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size) or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MMDiT expects input (B, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        cond = PromptCondition(*cond)
        states, mask = cond.encoder_hidden_states, cond.mask()
        if states.ndim != 3 or states.shape[0] != x.shape[0] or states.shape[-1] != self.caption_channels:
            raise ValueError(
                f"MMDiT expects encoder_hidden_states (B={x.shape[0]}, L, {self.caption_channels}), got {tuple(states.shape)}"
            )
        pooled = cond.pooled if cond.pooled is not None else masked_mean(states, mask)  # (B, D_pool)
        if pooled.shape != (x.shape[0], self.pooled_channels):
            raise ValueError(f"MMDiT expects pooled (B={x.shape[0]}, {self.pooled_channels}), got {tuple(pooled.shape)}")
        h = self.x_embedder(x)  # (B, N, D)
        if not self.use_rope:
            h = h + self.pos_embed.to(h.dtype)
        c = self.t_embedder(t) + self.pooled_embedder(pooled.to(h.dtype))  # (B, D)
        context = self.context_embedder(states.to(h.dtype))  # (B, L, D)
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h, context = checkpoint(block, h, context, c, mask, rope, use_reentrant=False)
            else:
                h, context = block(h, context, c, mask, rope)
        return self.unpatchify(self.final_layer(h, c))  # (B, out_channels, H, W)


# ------------------------------------------------------------------------------------------------
# Presets. The paper scales by depth d: hidden 64 d, d heads (sec. 5.2); d = 24 is SD3's 2B model
# (SD3 "medium", 1024 px: 128 x 128 x 16 latents, T5-XXL 4096 and pooled CLIP 2048), d = 38 its 8B.
# Small ones for CPU work use pooled = caption channels (the masked mean of the text states).
# ------------------------------------------------------------------------------------------------

_SD3 = dict(input_size=128, patch_size=2, in_channels=16, caption_channels=4096, pooled_channels=2048)
MMDIT_PRESETS: dict[str, dict[str, Any]] = {
    "MMDiT-d24/2": dict(_SD3, depth=24, hidden_size=64 * 24, num_heads=24),
    "MMDiT-d38/2": dict(_SD3, depth=38, hidden_size=64 * 38, num_heads=38),
    "MMDiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, pooled_channels=None),
    "MMDiT-XS/2": dict(depth=6, hidden_size=192, num_heads=3, patch_size=2, pooled_channels=None),
    "MMDiT-XS/4": dict(depth=6, hidden_size=192, num_heads=3, patch_size=4, pooled_channels=None),
    "MMDiT-T/2": dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, pooled_channels=None),
    "MMDiT-T/4": dict(depth=4, hidden_size=64, num_heads=4, patch_size=4, pooled_channels=None),
}
MODEL_FAMILIES.register("mmdit", presets=MMDIT_PRESETS, modality="image")(MMDiT)


def build_mmdit(name: str, **overrides: Any) -> MMDiT:
    """Build a preset ("MMDiT-d24/2", "MMDiT-XS/2", ...); overrides replace constructor arguments."""
    if name not in MMDIT_PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MMDIT_PRESETS)}")
    return MMDiT(**{**MMDIT_PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------
# diffusers SD3Transformer2DModel: config and key map. diffusers' AdaLayerNormContinuous (final
# layer, last block's text stream) chunks (scale, shift) where we chunk (shift, scale): swapped.
# ------------------------------------------------------------------------------------------------

_RENAMES = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("pooled_embedder.fc1.", "time_text_embed.text_embedder.linear_1."),
    ("pooled_embedder.fc2.", "time_text_embed.text_embedder.linear_2."),
    ("context_embedder.", "context_embedder."),
    ("blocks.{i}.adaLN_modulation.1.", "transformer_blocks.{i}.norm1.linear."),
    ("blocks.{i}.context_adaLN_modulation.1.", "transformer_blocks.{i}.norm1_context.linear."),
    ("blocks.{i}.attn.q_norm.", "transformer_blocks.{i}.attn.norm_q."),
    ("blocks.{i}.attn.k_norm.", "transformer_blocks.{i}.attn.norm_k."),
    ("blocks.{i}.attn.context_q_norm.", "transformer_blocks.{i}.attn.norm_added_q."),
    ("blocks.{i}.attn.context_k_norm.", "transformer_blocks.{i}.attn.norm_added_k."),
    ("blocks.{i}.attn.proj.", "transformer_blocks.{i}.attn.to_out.0."),
    ("blocks.{i}.attn.context_proj.", "transformer_blocks.{i}.attn.to_add_out."),
    ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("blocks.{i}.context_mlp.fc1.", "transformer_blocks.{i}.ff_context.net.0.proj."),
    ("blocks.{i}.context_mlp.fc2.", "transformer_blocks.{i}.ff_context.net.2."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("final_layer.linear.", "proj_out."),
]
_SPLITS = {
    "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.context_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}


def _check_exportable(model: MMDiT) -> None:
    o = model.options
    if o["norm"] != "layernorm" or o["mlp"] != "gelu" or o["pos_embed"] != "sincos" or o["mlp_ratio"] != 4.0:
        raise ConfigError(
            f"diffusers' SD3Transformer2DModel has no {o}: only an MMDiT with norm=layernorm, mlp=gelu, "
            "mlp_ratio=4, pos_embed=sincos can be exported"
        )


def _swapped_keys(depth: int) -> list[str]:
    """diffusers keys whose two halves are (scale, shift) rather than our (shift, scale)."""
    last = f"transformer_blocks.{depth - 1}.norm1_context.linear"
    return [f"{k}.{p}" for k in ("norm_out.linear", last) for p in ("weight", "bias")]


def _swap_halves(state: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    for key in keys:
        first, second = state[key].chunk(2, dim=0)
        state[key] = torch.cat([second, first])
    return state


def diffusers_config(model: MMDiT) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config that holds this model's weights. ``pos_embed_max_size``
    is None: the positions are the plain patch indices of our fixed grid (SD3's release instead
    crops a 192 x 192 table of rescaled positions; importing its weights would need that table)."""
    _check_exportable(model)
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": len(model.blocks),
        "attention_head_dim": model.hidden_size // model.num_heads,
        "num_attention_heads": model.num_heads,
        "joint_attention_dim": model.caption_channels,
        "caption_projection_dim": model.hidden_size,
        "pooled_projection_dim": model.pooled_channels,
        "pos_embed_max_size": None,
        "qk_norm": "rms_norm" if model.options["qk_norm"] else None,
    }


def to_diffusers_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    """This model's weights under ``SD3Transformer2DModel`` key names (loads there strictly)."""
    _check_exportable(model)
    state = convert_state_dict(model.state_dict(), _RENAMES, _SPLITS)
    return _swap_halves(state, _swapped_keys(len(model.blocks)))


def from_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_diffusers_state_dict`` (``MMDiT.load_state_dict(..., strict=True)`` accepts
    it); KeyError for keys MMDiT does not model (e.g. SD3.5's dual-attention ``attn2``)."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    state = _swap_halves(dict(state), _swapped_keys(depth))
    return convert_state_dict(state, _RENAMES, _SPLITS, reverse=True)

"""Cross-attention Diffusion Transformer for prompts, as PixArt-alpha (Chen et al. 2023, arXiv 2310.00426).

Read top to bottom: block, final layer, model, presets, the diffusers key map.

Each block (PixArt-alpha Fig. 4) is self-attention over the image tokens, cross-attention from the
image tokens to the projected caption tokens (padding masked out), then an MLP. Time enters
through **adaLN-single** (sec. 2.3): one shared projection ``t_block`` of the timestep embedding to
6 x hidden, to which every block adds its own learned ``scale_shift_table`` (6, hidden) to get its
shift/scale/gate for attention and MLP. The cross-attention is neither modulated nor gated.

    forward(x (B, C, H, W), t (B,) float timestep on the 0..1000 scale, cond: PromptCondition)
        -> (B, out_channels, H, W), out_channels = 2C with ``learn_sigma``

``cond.encoder_hidden_states`` is (B, L, caption_channels), ``cond.encoder_attention_mask`` (B, L)
bool (True = real token). The model knows nothing about noise or caption dropout: the null prompt
is an encoded empty caption.

Parameter names follow the PixArt-alpha release where they exist (``t_block``, ``cross_attn.q_linear``,
``cross_attn.kv_linear``, ``scale_shift_table``); ``to_diffusers_state_dict`` maps them onto
diffusers' ``PixArtTransformer2DModel`` (same output, tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditkit.errors import ConfigError
from ditkit.models.dit import DIT_PRESETS, PatchEmbed, sincos_1d
from ditkit.models.layers import (
    Attention,
    CrossAttention,
    Mlp,
    TimestepEmbedder,
    make_norm,
    modulate,
    rope_2d,
    run_blocks,
)
from ditkit.models.text_encoder import PromptCondition
from ditkit.registry import MODEL_FAMILIES

__all__ = [
    "CrossDiT",
    "CROSS_DIT_PRESETS",
    "build_cross_dit",
    "to_diffusers_state_dict",
    "from_diffusers_state_dict",
    "diffusers_config",
    "kwargs_from_diffusers_config",
    "convert_state_dict",
]


def sincos_2d_scaled(embed_dim: int, grid_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """(grid_size**2, embed_dim) float64 MAE table (first half of the channels from the column,
    second from the row) at positions ``index / interpolation_scale`` (PixArt at 1024 px uses 2)."""
    if embed_dim % 4:
        raise ConfigError(f"sin-cos position embedding needs hidden size divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    rows, cols = rows / interpolation_scale, cols / interpolation_scale
    return torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)


class CrossDiTBlock(nn.Module):
    """PixArt-alpha block: x (B, N, D), t6 (B, 6, D) from adaLN-single, context (B, L, D) -> (B, N, D)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
        norm: str = "layernorm", mlp: str = "gelu",
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, norm=norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm, norm=norm)
        self.norm2 = make_norm(norm, hidden_size, affine=False)
        self.mlp = Mlp(hidden_size, mlp_ratio, kind=mlp)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: torch.Tensor,
        t6: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # Chunk order of PixArt-alpha / diffusers; each (B, D).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table[None] + t6).unbind(1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + self.cross_attn(x, context, context_mask)  # no norm, no gate (PixArt-alpha)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Module):
    """Final norm, (shift, scale) = scale_shift_table (2, D) + t_emb, Linear: (B, N, D) -> (B, N, out)."""

    def __init__(self, hidden_size: int, out_features: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, out_features)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)  # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class CaptionProjection(nn.Module):
    """Encoder states (B, L, caption_channels) -> (B, L, D): Linear, GELU(tanh), Linear (PixArt y_proj)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_channels, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(states), approximate="tanh"))


class CrossDiT(nn.Module):
    """Prompt-conditioned DiT with cross-attention and adaLN-single (PixArt-alpha).

    Args (as ``DiT`` where shared):
        input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, learn_sigma.
        caption_channels: D_text of the encoder states (4096 for T5-XXL in the paper).
        qk_norm, norm ("layernorm" | "rmsnorm"), mlp ("gelu" | "swiglu"): backbone options.
        pos_embed: "sincos" (absolute 2-D table, PixArt) or "rope" (2-D RoPE in self-attention).
        interpolation_scale: sin-cos positions are index / scale (PixArt: max(input_size // 64, 1)).
        grad_checkpointing: recompute block activations in backward (training memory).
    Raises ConfigError for a size not divisible by the patch or an unknown pos_embed.
    """

    def __init__(
        self,
        input_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        pos_embed: str = "sincos",
        interpolation_scale: float | None = None,
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
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.caption_channels = hidden_size, num_heads, caption_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.grad_checkpointing = learn_sigma, grad_checkpointing
        self.options = dict(qk_norm=qk_norm, norm=norm, mlp=mlp, pos_embed=pos_embed)
        self.use_rope = pos_embed == "rope"
        self.grid_size = input_size // patch_size
        self.interpolation_scale = float(interpolation_scale or max(input_size // 64, 1))

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))  # adaLN-single
        self.caption_projection = CaptionProjection(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(
            CrossDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp) for _ in range(depth)
        )
        self.final_layer = T2IFinalLayer(hidden_size, patch_size * patch_size * self.out_channels, norm=norm)
        # Fixed tables: buffers outside the state dict (diffusers recomputes them too).
        if self.use_rope:
            cos, sin = rope_2d(self.grid_size, hidden_size // num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            self.register_buffer("pos_embed", torch.zeros(1, 1, hidden_size), persistent=False)
        else:
            table = sincos_2d_scaled(hidden_size, self.grid_size, self.interpolation_scale)
            self.register_buffer("pos_embed", table.float().unsqueeze(0), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-alpha init: xavier Linear/Conv, N(0, 0.02) for the timestep MLP, t_block and
        caption projection, zero cross-attention output and final Linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                       self.caption_projection.fc1, self.caption_projection.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
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
                f"CrossDiT expects input (B, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        cond = PromptCondition(*cond)
        states = cond.encoder_hidden_states
        if states.ndim != 3 or states.shape[0] != x.shape[0] or states.shape[-1] != self.caption_channels:
            raise ValueError(
                f"CrossDiT expects encoder_hidden_states (B={x.shape[0]}, L, {self.caption_channels}), got {tuple(states.shape)}"
            )
        h = self.x_embedder(x)  # (B, N, D)
        if not self.use_rope:
            h = h + self.pos_embed.to(h.dtype)
        t_emb = self.t_embedder(t)  # (B, D)
        t6 = self.t_block(t_emb).view(-1, 6, self.hidden_size)  # (B, 6, D), shared by all blocks
        context = self.caption_projection(states.to(h.dtype))  # (B, L, D)
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        h = run_blocks(self.blocks, h, t6, self.grad_checkpointing, context=context, context_mask=cond.mask(), rope=rope)
        return self.unpatchify(self.final_layer(h, t_emb))  # (B, out_channels, H, W)


# ------------------------------------------------------------------------------------------------
# Presets: every DiT size with cross-attention, and PixArt-alpha's XL/2 at 512 px (64x64 latents).
# ------------------------------------------------------------------------------------------------

CROSS_DIT_PRESETS: dict[str, dict[str, Any]] = {
    name.replace("DiT-", "CrossDiT-"): dict(dims) for name, dims in DIT_PRESETS.items()
}
CROSS_DIT_PRESETS["PixArt-XL/2"] = dict(
    DIT_PRESETS["DiT-XL/2"], input_size=64, in_channels=4, caption_channels=4096, learn_sigma=True
)
MODEL_FAMILIES.register("cross_dit", presets=CROSS_DIT_PRESETS, modality="image")(CrossDiT)


def build_cross_dit(name: str, **overrides: Any) -> CrossDiT:
    """Build a preset ("CrossDiT-XS/2", "PixArt-XL/2", ...); overrides replace constructor arguments."""
    if name not in CROSS_DIT_PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(CROSS_DIT_PRESETS)}")
    return CrossDiT(**{**CROSS_DIT_PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------
# diffusers PixArtTransformer2DModel: config and key map (fused qkv/kv split into to_q/to_k/to_v).
# ------------------------------------------------------------------------------------------------

# ours -> diffusers for keys that only change name; "{i}" is the block index. A prefix ends in
# "." (the parameter name follows), anything else is a whole key.
_RENAMES = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("caption_projection.fc1.", "caption_projection.linear_1."),
    ("caption_projection.fc2.", "caption_projection.linear_2."),
    ("blocks.{i}.attn.proj.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.cross_attn.q_linear.", "transformer_blocks.{i}.attn2.to_q."),
    ("blocks.{i}.cross_attn.proj.", "transformer_blocks.{i}.attn2.to_out.0."),
    ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
# fused ours -> the diffusers pieces it is split into (along dim 0), per block.
_SPLITS = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v")}


def _rename(key: str, renames: list[tuple[str, str]], reverse: bool) -> str | None:
    """Map one key through ``renames`` (diffusers -> ours when ``reverse``); None if no entry fits."""
    for ours, theirs in renames:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        index, rest = "", key
        if "{i}" in src:  # "prefix{i}suffix": the block index sits between
            prefix, src = src.split("{i}")
            if not key.startswith(prefix):
                continue
            index, _, tail = key[len(prefix):].partition(".")
            if not index.isdigit():
                continue
            rest = "." + tail
        if (src.endswith(".") and rest.startswith(src)) or rest == src:
            return dst.replace("{i}", index) + rest[len(src):]
    return None


def _check_exportable(model: CrossDiT) -> None:
    o = model.options
    if o["qk_norm"] or o["norm"] != "layernorm" or o["mlp"] != "gelu" or o["pos_embed"] != "sincos":
        raise ConfigError(
            f"diffusers' PixArtTransformer2DModel has no {o}: only a CrossDiT with qk_norm=False, "
            "norm=layernorm, mlp=gelu, pos_embed=sincos can be exported"
        )


def diffusers_config(model: CrossDiT) -> dict[str, Any]:
    """The ``PixArtTransformer2DModel`` config (``config.json``) that holds this model's weights."""
    _check_exportable(model)
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": len(model.blocks),
        "cross_attention_dim": model.hidden_size,
        "caption_channels": model.caption_channels,
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "interpolation_scale": model.interpolation_scale,
        "use_additional_conditions": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "num_embeds_ada_norm": 1000,
        "dropout": 0.0,
    }


def kwargs_from_diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """``CrossDiT`` constructor arguments from a ``PixArtTransformer2DModel`` config; ConfigError for
    what CrossDiT does not model (size-conditioning of PixArt 1024 px, other norms/activations)."""
    if config.get("use_additional_conditions") or (
        config.get("use_additional_conditions") is None and config.get("sample_size") == 128
    ):
        raise ConfigError("PixArt with resolution/aspect-ratio conditioning (use_additional_conditions) is not supported")
    if config.get("norm_type", "ada_norm_single") != "ada_norm_single" or config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ConfigError(f"unsupported PixArt config: norm_type={config.get('norm_type')}, activation_fn={config.get('activation_fn')}")
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(f"PixArt out_channels {out_channels} is neither in_channels nor 2 x in_channels")
    return dict(
        input_size=config.get("sample_size", 128), patch_size=config.get("patch_size", 2), in_channels=in_channels,
        hidden_size=heads * head_dim, depth=config.get("num_layers", 28), num_heads=heads,
        caption_channels=config["caption_channels"], learn_sigma=out_channels == 2 * in_channels,
        interpolation_scale=config.get("interpolation_scale"),
    )


def convert_state_dict(
    state: dict[str, torch.Tensor],
    renames: list[tuple[str, str]],
    splits: dict[str, tuple[str, ...]],
    reverse: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename a state dict between our keys and diffusers' (``reverse``: diffusers -> ours).

    ``renames``: (ours, theirs) key templates as ``_RENAMES``. ``splits``: a fused Linear inside
    block ``blocks.{i}`` (e.g. "attn.qkv") -> the diffusers Linears of ``transformer_blocks.{i}``
    it is split into along dim 0, in order. KeyError for a key no entry maps.
    """
    split_of = {name: fused for fused, names in splits.items() for name in names}
    ours_block, theirs_block = "blocks", "transformer_blocks"
    out: dict[str, torch.Tensor] = {}
    pieces: dict[tuple[str, str, str], torch.Tensor] = {}  # (block index, diffusers name, weight|bias)
    for key, value in state.items():
        parts = key.split(".")  # e.g. ["blocks", "3", "attn", "qkv", "weight"]
        inner = ".".join(parts[2:4])
        if not reverse and parts[0] == ours_block and len(parts) == 5 and inner in splits:
            names = splits[inner]
            for name, piece in zip(names, value.chunk(len(names), dim=0)):
                out[f"{theirs_block}.{parts[1]}.{name}.{parts[4]}"] = piece.clone()
            continue
        if reverse and parts[0] == theirs_block and len(parts) == 5 and inner in split_of:
            pieces[(parts[1], inner, parts[4])] = value
            continue
        new = _rename(key, renames, reverse)
        if new is None:
            raise KeyError(f"no {'ditkit' if reverse else 'diffusers'} name for the key {key}")
        out[new] = value if reverse else value.clone()
    for block, kind in sorted({(b, k) for b, _, k in pieces}):
        for fused, names in splits.items():
            if (block, names[0], kind) in pieces:
                out[f"{ours_block}.{block}.{fused}.{kind}"] = torch.cat([pieces[(block, n, kind)] for n in names])
    return out


def to_diffusers_state_dict(model: CrossDiT) -> dict[str, torch.Tensor]:
    """This model's weights under ``PixArtTransformer2DModel`` key names (loads there strictly)."""
    _check_exportable(model)
    return convert_state_dict(model.state_dict(), _RENAMES, _SPLITS)


def from_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_diffusers_state_dict``: a ``PixArtTransformer2DModel`` state dict under
    CrossDiT key names (``CrossDiT.load_state_dict(..., strict=True)`` accepts it). KeyError for a
    key it does not know (e.g. PixArt's resolution embedders)."""
    return convert_state_dict(state, _RENAMES, _SPLITS, reverse=True)

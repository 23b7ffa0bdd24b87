"""Building blocks shared by the image and text Diffusion Transformers.

Plain PyTorch; nothing here knows about noise. Key names of the modules follow the official
facebookresearch/DiT release (`t_embedder.mlp.0`, `attn.qkv`, `mlp.fc1`, `adaLN_modulation.1`, ...)
so its checkpoints load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT sec. 3.2): x * (1 + scale) + shift; x (B, N, D), shift/scale (B, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of `t` (B,) -> (B, dim), as in official DiT.

    Frequencies are max_period ** (-i / (half - freq_shift)), i = 0..half-1. Official DiT uses
    freq_shift = 0; diffusers' DiT uses downscale_freq_shift = 1 (divides by half - 1).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timestep (B,) -> vector (B, hidden): 256-frequency sinusoid, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, hidden). Row `num_classes` is the null class for guidance.

    In training mode labels are replaced by the null class with probability `dropout_prob`
    (classifier-free guidance training, Ho & Salimans 2022).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), optionally without a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def make_norm(kind: str, dim: int, affine: bool, eps: float = 1e-6) -> nn.Module:
    """'layernorm' or 'rmsnorm' over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"norm={kind!r}: choose 'layernorm' or 'rmsnorm'")


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary angles (Su et al. 2021, RoFormer eq. 15) for integer positions (N,) -> (N, dim // 2)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None]


def rope_2d(grid_size: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D RoPE for a grid_size x grid_size patch grid, row-major tokens.

    Half of the rotated pairs take the row index, half the column index. Returns (cos, sin),
    each (N, head_dim // 2) float32, N = grid_size ** 2.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    idx = torch.arange(grid_size)
    return rope_axes([idx.repeat_interleave(grid_size), idx.repeat(grid_size)], [head_dim // 4, head_dim // 4], theta)


def rope_axes(axes: list[torch.Tensor], pairs: list[int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial RoPE over several axes: token ``n`` has integer coordinate ``axes[a][n]`` on axis ``a``,
    whose rotation uses ``pairs[a]`` of the head's channel pairs (``sum(pairs) = head_dim // 2``).
    Returns (cos, sin), each (N, head_dim // 2) float32: ``rope_2d`` is the case ``[rows, cols]``
    with ``head_dim // 4`` pairs each."""
    angles = torch.cat([rope_angles(pos, 2 * k, theta) for pos, k in zip(axes, pairs)], -1)
    return angles.cos().float(), angles.sin().float()


def rope_1d(seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE for positions 0..seq_len-1: (cos, sin), each (seq_len, head_dim // 2)."""
    angles = rope_angles(torch.arange(seq_len), head_dim, theta)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hd/2) of x (B, nh, N, hd) by angles given as cos/sin (N, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for q, k, v (B, nh, N, hd) -> (B, nh, N, hd).

    F.scaled_dot_product_attention everywhere, except bf16/fp16 on the CPU for up to 1024 tokens:
    there two explicit matmuls (which run on AMX) beat the CPU flash kernel 2-3x in forward plus
    backward (benchmarks/attention.py). The softmax kernel accumulates in float32 either way.
    """
    N = q.shape[-2]
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and N <= 1024:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, nh, N, N)
        if is_causal:
            mask = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (timm key names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, norm: str = "layernorm"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = attention(q, k, v, is_causal=is_causal)  # (B, nh, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Transformer MLP: GELU(tanh) with a 4x hidden layer, or SwiGLU (Shazeer 2020).

    SwiGLU keeps the parameter count of the GELU MLP by using 2/3 of its hidden width;
    `fc1` then produces the gate and the value halves together.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kind: str = "gelu"):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if kind == "swiglu":
            hidden = int(2 * hidden / 3)
            self.fc1 = nn.Linear(dim, 2 * hidden)
        elif kind == "gelu":
            self.fc1 = nn.Linear(dim, hidden)
        else:
            raise ValueError(f"mlp={kind!r}: choose 'gelu' or 'swiglu'")
        self.kind = kind
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3).

    x (B, N, D), c (B, D) -> (B, N, D). The modulation Linear is zero-initialised by the owner
    model, so a new block is the identity.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, norm=norm)
        self.norm2 = make_norm(norm, hidden_size, affine=False)
        self.mlp = Mlp(hidden_size, mlp_ratio, kind=mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        # Chunk order fixed by the official checkpoints.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope, is_causal=is_causal)
        x = x + gate_msa.unsqueeze(1) * attn
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Final adaLN (shift, scale) and Linear to the per-token output size: (B, N, D) -> (B, N, out)."""

    def __init__(self, hidden_size: int, out_features: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    c: torch.Tensor,
    grad_checkpointing: bool,
    **kwargs,
) -> torch.Tensor:
    """Apply the blocks in order, with per-block activation checkpointing when asked (training only)."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, c, use_reentrant=False, **kwargs)
        else:
            x = block(x, c, **kwargs)
    return x


def init_adaln_zero(module: nn.Module) -> None:
    """DiT initialisation: xavier-uniform Linear weights, zero biases; then zero every adaLN
    modulation Linear and the final Linear so the model starts as the identity / outputs zeros."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the keys that ``key_padding_mask`` keeps.

    q (B, nh, Nq, hd), k and v (B, nh, Nk, hd) -> (B, nh, Nq, hd). ``key_padding_mask`` (B, Nk)
    bool, True = a real key (the Hugging Face convention; caption padding is False), or None (all
    keys). A row with no real key at all attends to nothing: its output is zeros rather than the
    NaN a softmax over an empty set would give.
    """
    if key_padding_mask is None:
        return attention(q, k, v)
    keep = key_padding_mask.to(torch.bool)  # (B, Nk)
    any_key = keep.any(dim=-1)  # (B,)
    # Rows without any key get a harmless all-True mask, then their output is zeroed.
    keep = keep | ~any_key[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    return out * any_key.to(out.dtype)[:, None, None, None]


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (B, N, D) to a context ``c`` (B, L, D_ctx) -> (B, N, D).

    PixArt-alpha key names (``q_linear``, ``kv_linear``, ``proj``); ``context_mask`` (B, L) bool,
    True = a real context token (see ``masked_attention``).

    Setting ``attention_store`` to a list makes every forward append its attention probabilities
    (B, nh, N, L) float32, detached (zeros on padding), e.g. for word heat maps (DAAM, Tang et al.
    2022); the output is the same, computed with explicit matmuls instead of the fused kernel.
    """

    attention_store: list[torch.Tensor] | None = None

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = False, norm: str = "layernorm"
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        L = context.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        kv = self.kv_linear(context).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, nh, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.attention_store is None:
            out = masked_attention(q, k, v, context_mask)  # (B, nh, N, hd)
        else:
            scores = (q.float() * self.head_dim**-0.5) @ k.float().transpose(-1, -2)  # (B, nh, N, L)
            if context_mask is not None:
                scores = scores.masked_fill(~context_mask.to(torch.bool)[:, None, None, :], float("-inf"))
            probs = scores.softmax(dim=-1).nan_to_num(0.0)  # an all-padding row attends to nothing
            self.attention_store.append(probs.detach())
            out = (probs @ v.float()).to(v.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

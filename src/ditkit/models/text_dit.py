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

Two further attention layouts serve block diffusion (BD3-LM, Arriola et al. 2025) and fast sampling:

* ``forward(x_t, t, y, clean=x0, block_size=k)``: BD3-LM's vectorised two-pass training forward.
  The noisy ``x_t`` and the clean ``x0`` (both ``(B, L)``, both at positions ``0..L-1``) run as one
  sequence of ``2L`` tokens under the mask of the paper (its Sec. 3.2 and Fig. 2): a noisy block
  sees itself (block diagonal) and the clean blocks before it (offset block-causal); a clean block
  sees itself and the clean blocks before it (block-causal). Logits of the noisy half come back.
* a ``KVCache`` bound with ``model.use_kv_cache(cache)``: each call's tokens come after the
  ``cache.length`` tokens already cached (positions continue), they attend to the cached keys and
  values and, by the cache's layout, to each other (causal model: causal; ``cache.block_size = k``:
  block-causal; else all); with ``cache.store`` their keys and values are appended. It is bound to
  the model rather than passed as an argument so that the wrappers between a sampler and the
  network (classifier-free guidance doubles the batch; autocast) need not know about it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditkit.registry import MODEL_FAMILIES

from ditkit.models.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    apply_rope,
    init_adaln_zero,
    modulate,
    rope_1d,
    run_blocks,
)

__all__ = ["TextDiT", "KVCache", "TEXT_DIT_PRESETS", "build_text_dit", "text_forward_macs", "block_causal_mask",
           "two_pass_mask"]


class _Setting:
    """``with _Setting(obj, "attr", value, result):`` sets ``obj.attr = value`` for the block,
    returns ``result``, and restores the old value after it (even on errors)."""

    def __init__(self, obj: Any, attr: str, value: Any, result: Any) -> None:
        self.obj, self.attr, self.value, self.result = obj, attr, value, result

    def __enter__(self) -> Any:
        self.before = getattr(self.obj, self.attr)
        setattr(self.obj, self.attr, self.value)
        return self.result

    def __exit__(self, *exc: object) -> None:
        setattr(self.obj, self.attr, self.before)


class KVCache:
    """Keys and values of finished tokens, one ``(B, nh, n, hd)`` pair per block of the network.

    Args:
        block_size: attention layout of the tokens fed through it: ``None`` follows the model
            (causal for a causal model, else full); ``k`` is block-causal over blocks of ``k``
            positions (BD3-LM), so a block sees every earlier block and itself.
        store: whether a forward appends its keys and values (``False``: a read-only pass, e.g. a
            noisy block that is still being denoised).
    """

    def __init__(self, block_size: int | None = None, store: bool = True) -> None:
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.store = block_size, store
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0  # tokens cached (positions 0 .. length - 1)

    def reset(self) -> None:
        """Forget every cached token."""
        self.keys, self.values, self.length = [], [], 0

    def storing(self, store: bool = True) -> _Setting:
        """``with cache.storing(False):`` forwards in the block only read the cache (``True``: append)."""
        return _Setting(self, "store", store, self)


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int | None, causal: bool) -> torch.Tensor | None:
    """``(Nq, Nk)`` bool, True where query position ``q_pos[i]`` may see key position ``k_pos[j]``:
    block-causal (``k_pos // block_size <= q_pos // block_size``), causal, or None (all visible)."""
    if block_size is not None:
        return (k_pos[None, :] // block_size) <= (q_pos[:, None] // block_size)
    if causal:
        return k_pos[None, :] <= q_pos[:, None]
    return None


def two_pass_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """BD3-LM's training mask ``(2L, 2L)`` bool over ``[x_t (L), x0 (L)]`` (Arriola et al. 2025,
    Sec. 3.2): noisy block b sees noisy block b (block diagonal) and clean blocks < b (offset
    block-causal); clean block b sees clean blocks <= b (block-causal); clean never sees noisy."""
    block = torch.arange(seq_len, device=device) // block_size
    q, k = block[:, None], block[None, :]
    noisy = torch.cat([q == k, k < q], dim=1)  # (L, 2L)
    clean = torch.cat([torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device), k <= q], dim=1)
    return torch.cat([noisy, clean], dim=0)


def _masked_block(
    block: DiTBlock,
    x: torch.Tensor,
    c: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    cache: KVCache | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """One ``DiTBlock`` (the same weights and maths as ``DiTBlock.forward``) with an explicit
    boolean attention ``mask`` ``(N, N_keys)`` and optional cached keys/values in front of the new ones."""
    B, N, D = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    attn = block.attn
    h = modulate(block.norm1(x), shift_msa, scale_msa)
    q, k, v = attn.qkv(h).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, N, hd)
    if cache is not None:
        if layer < len(cache.keys):
            k_all, v_all = torch.cat([cache.keys[layer], k], 2), torch.cat([cache.values[layer], v], 2)
        else:
            k_all, v_all = k, v
        if cache.store:
            if layer < len(cache.keys):
                cache.keys[layer], cache.values[layer] = k_all, v_all
            else:
                cache.keys.append(k_all)
                cache.values.append(v_all)
        k, v = k_all, v_all
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, N, hd)
    x = x + gate_msa.unsqueeze(1) * attn.proj(out.transpose(1, 2).reshape(B, N, D))
    return x + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))


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

    ``step_cache`` (None, or a ``models.caching.StepCache`` the pipelines set while sampling) runs
    the block stack in place of the plain loop.
    """

    step_cache: Any = None

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
        self._kv_cache: KVCache | None = None  # bound by use_kv_cache (sampling only)
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

    def use_kv_cache(self, cache: KVCache) -> _Setting:
        """``with model.use_kv_cache(cache):`` every forward in the block continues after ``cache``
        (see the module docstring); returns ``cache``."""
        if self.causal and cache.block_size is not None:
            raise ValueError("a causal TextDiT attends token by token: use KVCache(block_size=None)")
        return _Setting(self, "_kv_cache", cache, cache)

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rope(int(positions.max()) + 1, positions.device)
        return cos[positions], sin[positions]

    def forward(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        clean: torch.Tensor | None = None,
        block_size: int | None = None,
    ) -> torch.Tensor:
        """``tokens`` (B, L) int64, ``t`` (B,) on the 0..1000 scale (ignored without time
        conditioning), ``y`` (B,) labels -> logits (B, L, vocab_size). ``clean`` (B, L) with
        ``block_size``: BD3-LM's two-pass forward (``tokens`` are the noisy ``x_t``); ``block_size``
        alone: block-causal attention over ``tokens``. A bound ``KVCache`` continues after it."""
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"TextDiT expects int64 token ids (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if clean is not None and (block_size is None or clean.shape != tokens.shape):
            raise ValueError(f"the two-pass forward needs block_size and clean tokens of shape {tuple(tokens.shape)}")
        if block_size is not None and self.causal:
            raise ValueError("block-causal attention needs a bidirectional TextDiT: build it with causal=False")
        B, L = tokens.shape
        x = self.tok_embedder(tokens if clean is None else torch.cat([tokens, clean], 1))  # (B, L or 2L, D)
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
        if self._kv_cache is not None or block_size is not None:
            return self._forward_masked(x, c, L, block_size, clean is not None)
        rope = self._rope(L, x.device)
        if self.step_cache is not None:  # sampling-time reuse between steps (models/caching.py)
            x = self.step_cache(self.blocks, x, c, rope=rope, is_causal=self.causal)
        else:
            x = run_blocks(self.blocks, x, c, self.grad_checkpointing, rope=rope, is_causal=self.causal)
        return self.final_layer(x, c)  # (B, L, vocab_size)

    def _forward_masked(self, x: torch.Tensor, c: torch.Tensor, L: int, block_size: int | None, two_pass: bool) -> torch.Tensor:
        """The block stack with an explicit mask: two-pass training, block-causal, or after a KV cache.
        ``x`` (B, L or 2L, D) embedded tokens -> logits (B, L, V)."""
        cache = self._kv_cache
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + L, device=x.device)
        if two_pass:
            if cache is not None:
                raise ValueError("the two-pass training forward does not take a KV cache")
            mask = two_pass_mask(L, block_size, x.device)  # type: ignore[arg-type]
            positions = torch.cat([positions, positions])  # both copies sit at 0..L-1
        else:
            layout = block_size if cache is None or cache.block_size is None else cache.block_size
            mask = block_causal_mask(positions, torch.arange(start + L, device=x.device), layout, self.causal)
            if mask is not None and bool(mask.all()):
                mask = None  # e.g. one new token of a causal model: every key is visible
        rope = self._rope_at(positions)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(_masked_block, block, x, c, rope, mask, use_reentrant=False)
            else:
                x = _masked_block(block, x, c, rope, mask, cache, i)
        if cache is not None and cache.store:
            cache.length += L
        return self.final_layer(x[:, :L], c)  # (B, L, vocab_size): the noisy half of a two-pass input


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

"""Block discrete diffusion for tokens: BD3-LM (Arriola et al. 2025, arXiv 2503.09573).

A sequence of ``L`` tokens is cut into ``L / block_size`` blocks. The model is autoregressive over
blocks and a masked diffusion (MDLM, ``diffusion/masked.py``) within each block:

    -log p(x) <= sum_b NELBO(x_b | x_{<b})                                       (BD3-LM eq. 7)
    NELBO(x_b | x_{<b}) = E_{t_b} E_{z_b ~ q(.|x_b, t_b)} [ (1 / t_b) sum_{l in b : z^l = mask} -log p(x^l | z_b, x_{<b}) ]

with the log-linear schedule of MDLM (a token masked with probability ``(1 - eps) t``, so
``alpha'_t / (1 - alpha_t) = -1 / t``) and an independent time ``t_b`` per block. Time convention
(docs/architecture.md): ``t in [0, 1]``, data at ``t = 0``.

Training runs every block at once with the vectorised two-pass forward (BD3-LM Sec. 3.2):
``model(z_t, t, y, clean=x0, block_size=k)`` sees the noisy and the clean sequence side by side
under the block-causal mask (``models.text_dit.two_pass_mask``), so block ``b``'s logits condition
on the clean blocks before it, exactly as at sampling time with a KV cache over finished blocks.

Clipped schedule (BD3-LM Sec. 4, "clipped noise schedules for low-variance gradients"): training
draws each block's ``t`` from ``U[noise_min, noise_max]`` instead of ``U(0, 1]``; extreme mask
rates (almost nothing masked: a large ``1 / t`` weight on one token; almost everything masked)
carry most of the gradient variance at small block sizes. The clipped loss is then a training
objective, not a bound: likelihoods are scored with ``t ~ U(0, 1]`` (``loss_terms(..., t=...)``,
as ``ditkit.eval.text.block_diffusion_bound`` does).

Limits: ``block_size = L`` is one block, i.e. MDLM (the same loss for the same ``t``, ``z_t``);
``block_size = 1`` gives each token its own block: a masked token sees the clean tokens before it,
so its term is ``-log p(x^l | x^{<l})`` whatever ``t``, and the bound is the autoregressive NLL
(times ``1 - eps``; exact for ``eps = 0``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ditkit.diffusion.masked import log_linear_alpha, stratified_times, subs_log_probs
from ditkit.diffusion.objective import Objective
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES

__all__ = ["BlockDiffusion", "BlockDenoiser"]


class BlockDenoiser:
    """What the block sampler (``samplers/block.py``) calls: ``denoise`` a noisy block after the
    committed context, and ``commit`` finished tokens to that context.

    ``net(tokens (B, n) int64, t_1000 (B,)) -> logits (B, n, V)`` is the network (conditioning
    bound) whose model has ``cache`` bound (``TextDiT.use_kv_cache``; ``cache.block_size`` set), so
    every call continues after the ``cache.length`` tokens the cache holds.

    * ``use_cache=True``: ``commit`` runs the finished tokens once, storing their keys and values;
      ``denoise`` runs only the block, reading them (BD3-LM's KV cache over finished blocks).
    * ``use_cache=False``: nothing is kept between calls; ``denoise`` runs the whole context plus the
      block, block-causally, every time (the same numbers, the reference for the cached path).

    ``context_len``: the training window. When the context and the next block would not fit, the
    oldest whole blocks are dropped and the rest is re-encoded from position 0, so positions stay
    within what the model was trained on (generation of any length).
    """

    def __init__(
        self, net: Callable[[Tensor, Tensor], Tensor], cache: Any, *, mask_id: int, block_size: int,
        context_len: int, use_cache: bool = True,
    ) -> None:
        if context_len < 2 * block_size:
            raise ValueError(f"context_len {context_len} must hold at least two blocks of {block_size}")
        self.net, self.cache, self.mask_id, self.block_size = net, cache, mask_id, block_size
        self.context_len, self.use_cache = context_len, use_cache
        self.context: Tensor | None = None  # (B, n) committed tokens, n a multiple of block_size
        self.calls = 0  # network calls (the commits included)

    def _run(self, tokens: Tensor, store: bool, t: Tensor | None = None) -> Tensor:
        self.calls += 1
        t = torch.zeros(tokens.shape[0], device=tokens.device) if t is None else t  # finished tokens: t = 0
        with self.cache.storing(store):
            return self.net(tokens, 1000.0 * t)

    def commit(self, tokens: Tensor) -> None:
        """Append finished tokens ``(B, n)``, ``n`` a multiple of ``block_size``, to the context."""
        if tokens.shape[1] % self.block_size:
            raise ValueError(f"commit whole blocks: got {tokens.shape[1]} tokens for blocks of {self.block_size}")
        if tokens.shape[1] == 0:
            return
        self.context = tokens if self.context is None else torch.cat([self.context, tokens], 1)
        keep = (self.context_len - self.block_size) // self.block_size * self.block_size
        if self.context.shape[1] > keep:  # slide the window by whole blocks; re-encode from position 0
            self.context = self.context[:, self.context.shape[1] - keep :]
            if self.use_cache:
                self.cache.reset()
                self._run(self.context, store=True)
            return
        if self.use_cache:
            self._run(tokens, store=True)

    def denoise(self, z: Tensor, t: Tensor) -> Tensor:
        """SUBS log-probabilities ``(B, n, V + 1)`` of the block ``z`` ``(B, n)`` (mask id where
        unknown, ``n <= block_size``) after the context; ``t`` ``(B,)`` in [0, 1] (time-free models
        ignore it)."""
        if self.use_cache:
            logits = self._run(z, store=False, t=t)
        else:
            self.cache.reset()
            seq = z if self.context is None else torch.cat([self.context, z], 1)
            logits = self._run(seq, store=False, t=t)[:, -z.shape[1] :]
        return subs_log_probs(logits, z, self.mask_id)


@OBJECTIVES.register("block", modality="text", family="block")
class BlockDiffusion(Objective):
    """BD3-LM objective: per-block masked diffusion, block-causal context, clipped time range.

    Args:
        vocab_size: real tokens ``V``; the mask id is ``V``.
        block_size: tokens per block (``L`` must be a multiple; ``L``: MDLM, 1: autoregressive).
        eps: the log-linear schedule's floor (MDLM).
        noise_min, noise_max: training draws ``t ~ U[noise_min, noise_max]`` per block (the clipped
            schedule; ``0, 1`` is the unclipped NELBO).
    """

    family = "block"
    default_sampler = "block"

    def __init__(self, vocab_size: int, block_size: int, eps: float = 1e-3, noise_min: float = 0.0, noise_max: float = 1.0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= noise_min < noise_max <= 1.0:
            raise ValueError(f"need 0 <= noise_min < noise_max <= 1, got {noise_min}, {noise_max}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.vocab_size, self.mask_id, self.block_size = vocab_size, vocab_size, block_size
        self.eps, self.noise_min, self.noise_max = eps, noise_min, noise_max

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "BlockDiffusion":
        """From a full config: ``data.vocab_size``, ``data.seq_len``, ``objective.mask_eps`` and
        (read with defaults until the config has them) ``objective.block_size`` (16, or the largest
        divisor of ``seq_len`` below 16),
        ``objective.noise_min`` / ``objective.noise_max`` (0, 1). ``ConfigError`` when the
        vocabulary is unknown or ``seq_len`` is not a multiple of the block size."""
        if cfg.data.vocab_size is None:
            raise ConfigError("data.vocab_size must be known to build a text objective (set by training)")
        o, seq_len = cfg.objective, cfg.data.seq_len
        # Until the config has objective.block_size: 16, or the largest divisor of seq_len below it.
        block_size = getattr(o, "block_size", None) or max(d for d in range(1, 17) if seq_len % d == 0)
        block_size = int(block_size)
        if block_size < 1 or seq_len % block_size:
            raise ConfigError(
                f"objective.block_size={block_size} must divide data.seq_len={cfg.data.seq_len}: pick a divisor "
                f"(e.g. {', '.join(str(d) for d in (1, 4, 16, cfg.data.seq_len) if cfg.data.seq_len % d == 0)})"
            )
        lo, hi = float(getattr(o, "noise_min", 0.0)), float(getattr(o, "noise_max", 1.0))
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"objective.noise_min={lo} / noise_max={hi}: need 0 <= noise_min < noise_max <= 1 (BD3-LM: 0.3, 0.8)")
        return cls(cfg.data.vocab_size, block_size, eps=o.mask_eps, noise_min=lo, noise_max=hi)

    # ---------------------------------------------------------------- forward process
    def num_blocks(self, seq_len: int) -> int:
        if seq_len % self.block_size:
            raise ValueError(f"sequence length {seq_len} is not a multiple of block_size {self.block_size}")
        return seq_len // self.block_size

    def sample_times(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", clipped: bool = True) -> Tensor:
        """``(B, L / block_size)`` float32 per-block times, stratified over all ``B * num_blocks``
        draws (each marginally uniform), in ``[noise_min, noise_max]`` (``clipped``) or (0, 1]."""
        nb = self.num_blocks(seq_len)
        u = stratified_times(batch_size * nb, generator=generator, device=device).view(batch_size, nb)
        if not clipped:
            return u
        return self.noise_min + (self.noise_max - self.noise_min) * u

    def mask_tokens(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z_t`` ``(B, L)``: token ``l`` of block ``b`` masked with probability ``(1 - eps) t[:, b]``."""
        t_tok = t.repeat_interleave(self.block_size, dim=1)  # (B, L)
        on = generator.device if generator is not None else x0.device
        u = torch.rand(x0.shape, generator=generator, device=on).to(x0.device)
        masked = u < 1.0 - log_linear_alpha(t_tok, self.eps)
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    def global_draws(self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator) -> dict[str, Tensor]:
        """``t`` ``(b, L / block_size)`` and ``z_t`` ``(b, L)`` of this rank's ``rows`` of a global
        micro-batch, drawn as ``loss_terms`` draws them for the whole batch; ``x`` is this rank's share."""
        t = self.sample_times(global_batch, x.shape[1], generator, x.device)
        x0 = x.new_zeros((global_batch, *x.shape[1:]))  # other ranks' rows: only their shape matters
        x0[rows] = x
        return {"t": t[rows], "z_t": self.mask_tokens(x0, t, generator)[rows]}

    def prior_nats_per_token(self) -> float:
        """``eps * log V``: the prior term at ``t = 1`` per token (as MDLM)."""
        return self.eps * math.log(self.vocab_size)

    # ---------------------------------------------------------------- loss
    def loss_terms(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        z_t: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sequence terms ``(B,)``: ``nll`` = ``sum_b (1/t_b) sum_{masked l in b} -log p(x^l | z_b, x_{<b})``
        (nats), ``num_tokens`` (``L``), ``loss`` (``nll / L``), ``num_masked``. ``t`` ``(B, L / block_size)``
        (default: clipped draws) and ``z_t`` ``(B, L)`` may be given; a ``(B,)`` ``t`` is one time
        for every block."""
        if x0.dtype != torch.long or x0.ndim != 2:
            raise ValueError(f"block diffusion expects int64 token ids (B, L), got {tuple(x0.shape)} {x0.dtype}")
        if getattr(model, "causal", False):
            raise ValueError("block diffusion needs a bidirectional model: build the TextDiT with causal=False")
        if getattr(model, "time_conditioning", False):
            raise ValueError("block diffusion draws one time per block: build the TextDiT with time_conditioning=False")
        B, L = x0.shape
        nb = self.num_blocks(L)
        if t is None:
            t = self.sample_times(B, L, generator, x0.device)
        elif t.ndim == 1:
            t = t.unsqueeze(1).expand(B, nb)
        if z_t is None:
            z_t = self.mask_tokens(x0, t, generator)
        logits = model(z_t, 1000.0 * t.mean(1), y, clean=x0, block_size=self.block_size)  # (B, L, V)
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"model returned {logits.shape[-1]} classes for a vocabulary of {self.vocab_size}")
        ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L) nats
        masked = z_t == self.mask_id
        weight = 1.0 / t.to(ce.dtype).repeat_interleave(self.block_size, dim=1)  # -alpha'_t / (1 - alpha_t)
        nll = (ce * masked * weight).sum(1)
        num_tokens = torch.full_like(nll, L)
        return {"nll": nll, "num_tokens": num_tokens, "loss": nll / num_tokens, "num_masked": masked.sum(1)}

    def count_form_nll(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        num_masked: Tensor | None = None,
    ) -> Tensor:
        """The same bound in its number-of-masks form, ``(B,)`` nats per sequence (MDLM's
        ``count_form_nll`` per block): ``sum_b (k / n_b) sum_{l in M_b} -log p(x^l | z_b, x_{<b})``
        with ``n_b ~ U{1..k}`` masks at a uniformly random set ``M_b`` of block ``b`` (``k`` the
        block size). Unlike the ``1/t`` form its variance is finite for small blocks, and for
        ``block_size = 1`` it is exact (one mask per block: the AR NLL). ``num_masked``
        ``(B, L / k)`` in ``1..k`` may be given (default: stratified over all blocks)."""
        B, L = x0.shape
        nb, k = self.num_blocks(L), self.block_size
        if num_masked is None:
            u = stratified_times(B * nb, generator=generator, device=x0.device).view(B, nb)
            num_masked = torch.ceil(u * k).long().clamp(1, k)
        on = generator.device if generator is not None else x0.device
        rank = torch.rand(B, nb, k, generator=generator, device=on).to(x0.device).argsort(2).argsort(2)
        masked = (rank < num_masked.unsqueeze(2)).view(B, L)  # a uniform subset of n_b positions per block
        z = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        t = (num_masked.float() / k / (1.0 - self.eps)).clamp(max=1.0)  # time input; ignored by t-free models
        logits = model(z, 1000.0 * t.mean(1), y, clean=x0, block_size=k)
        ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
        weight = (k / num_masked.to(ce.dtype)).repeat_interleave(k, dim=1)
        return (ce * masked * weight).sum(1)

    # ---------------------------------------------------------------- sampling adapter
    def denoiser(self, net: Callable[[Tensor, Tensor], Tensor], cache: Any, *, context_len: int,
                 use_cache: bool = True) -> BlockDenoiser:
        """The block sampler's denoiser over ``net`` (conditioning bound; its model has ``cache``,
        a ``KVCache(block_size)``, bound); see ``BlockDenoiser``."""
        if getattr(cache, "block_size", None) != self.block_size:
            raise ValueError(f"the KV cache must have block_size={self.block_size}")
        return BlockDenoiser(net, cache, mask_id=self.mask_id, block_size=self.block_size,
                             context_len=context_len, use_cache=use_cache)

"""Left-to-right sampling for the autoregressive baseline. Pure function; torch only.

``next_token`` is ``fn(tokens (B, n) int64) -> (B, V)`` log-probabilities of the next token:
``AutoregressiveLM.denoiser`` adds BOS, crops to the training window and runs the network on all of
it for every token; ``cached_next_token`` gives the same numbers from a KV cache, running the
network only on the tokens it has not seen (one per step), so a step costs O(n) instead of O(n^2).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.masked import Generator, gumbel_argmax

__all__ = ["autoregressive", "cached_next_token"]


def cached_next_token(
    net: Callable[[Tensor, Tensor], Tensor], cache: Any, *, bos_id: int, context_len: int
) -> Callable[[Tensor], Tensor]:
    """``fn(tokens (B, n)) -> (B, V)`` float32 next-token log-probabilities, the contract (and the
    numbers) of ``AutoregressiveLM.denoiser(net, context_len)``, from a KV cache.

    ``net(x (B, m), t (B,)) -> logits (B, m, V)`` is the causal network (conditioning bound) whose
    model has ``cache`` bound (``TextDiT.use_kv_cache``): each call feeds only ``[BOS, tokens]``
    past ``cache.length``. Within the training window that is exact; past it the uncached
    denoiser drops the oldest token every step, which changes every cached key, so the window is
    re-encoded each step there (exact, but no faster). A shorter or new sequence resets the cache.
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")

    def fn(tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        if n + 1 > context_len:  # beyond the window: BOS + the last context_len - 1 tokens, from scratch
            cache.reset()
            tokens = tokens[:, n - (context_len - 1) :]
        bos = torch.full((tokens.shape[0], 1), bos_id, dtype=torch.long, device=tokens.device)
        inp = torch.cat([bos, tokens], 1)  # (B, m)
        if cache.length >= inp.shape[1]:  # nothing new: another sequence than the cached one
            cache.reset()
        new = inp[:, cache.length :]
        return F.log_softmax(net(new, torch.zeros(inp.shape[0], device=inp.device))[:, -1].float(), dim=-1)

    return fn


@SAMPLERS.register("autoregressive", family="autoregressive", options=("temperature", "top_k"))
@torch.no_grad()
def autoregressive(
    next_token: Callable[[Tensor], Tensor],
    prefix: Tensor,
    num_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: Generator = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Ancestral next-token sampling with temperature and top-k (Fan et al. 2018); ``prefix`` ``(B, P)``
    (``P`` may be 0) -> ``(B, P + num_new_tokens)``. Gumbel-max with float64 noise; temperature 0 is
    greedy. ``callback(i, tokens)`` after each new token."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    tokens = prefix.clone()
    for i in range(num_new_tokens):
        logp = next_token(tokens)  # (B, V)
        if top_k is not None and top_k < logp.shape[-1]:
            kth = logp.topk(top_k, dim=-1).values[:, -1:]
            logp = torch.where(logp < kth, torch.full_like(logp, -math.inf), logp)
        nxt = gumbel_argmax(logp, generator, temperature)  # (B,)
        tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
        if callback is not None:
            callback(i, tokens)
    return tokens

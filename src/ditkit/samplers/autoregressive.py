"""Left-to-right sampling for the autoregressive baseline. Pure function; torch only.

``next_token`` is ``fn(tokens (B, n) int64) -> (B, V)`` log-probabilities of the next token
(``AutoregressiveLM.denoiser``, which adds BOS and crops to the training window). No KV cache: each
step runs the network on the visible window, which is simple and fine at the sizes trained here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.masked import Generator, gumbel_argmax

__all__ = ["autoregressive"]


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

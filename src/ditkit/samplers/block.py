"""Block-by-block generation for block diffusion (BD3-LM, Arriola et al. 2025, Alg. 2). Pure function; torch only.

The denoiser (``BlockDiffusion.denoiser``) has two calls: ``denoise(z (B, n) int64, t (B,)) -> (B, n, V + 1)``
SUBS log-probabilities of a noisy block after the committed context, and ``commit(tokens (B, k * block_size))``
which appends finished blocks to that context (with a KV cache: their keys and values are
computed once, then only read). Within a block the steps are MDLM's ancestral sampler
(``samplers/masked.ancestral``, with its remasking options); across blocks generation is
autoregressive, so any length can be drawn, and it stops early once every row has produced
``stop_id`` (an end-of-sequence or separator token) after the prompt.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.masked import Generator, ancestral

__all__ = ["block_diffusion"]


@SAMPLERS.register("block", family="block", options=("remasking", "temperature", "stop_id"))
@torch.no_grad()
def block_diffusion(
    denoiser: Any,
    prefix: Tensor,
    num_new_tokens: int,
    *,
    block_size: int,
    num_steps: int,
    mask_id: int,
    stop_id: int | None = None,
    generator: Generator = None,
    callback: Callable[[int, Tensor], None] | None = None,
    step_callback: Callable[[int, Tensor], None] | None = None,
    **block_options: Any,
) -> Tensor:
    """Generate ``num_new_tokens`` after ``prefix`` ``(B, P)`` (``P`` may be 0; ``mask_id`` in it marks
    positions to fill, an infill template read left to right) -> ``(B, P + n)``,
    ``n <= num_new_tokens`` (fewer when every row has emitted ``stop_id``; the caller cuts each row
    at its first ``stop_id``).

    The prompt's whole blocks before its first mask are committed first; its later tokens are
    fixed positions of the blocks they fall in. Each block runs ``num_steps`` ancestral steps
    (``block_options``: remasking, temperature, cache; see ``samplers.masked.ancestral``), then is
    committed. ``callback(b, tokens)`` after each block ``b``; ``step_callback(k, tokens)`` after every
    ancestral step, ``k = b * num_steps + i`` counted over the blocks, ``tokens`` ``(B, P' + width)``
    the finished blocks followed by the current block's state (its masked positions still ``mask_id``).
    """
    if num_new_tokens < 0 or num_steps < 1 or block_size < 1:
        raise ValueError(f"need num_new_tokens >= 0, num_steps >= 1, block_size >= 1; got {num_new_tokens}, {num_steps}, {block_size}")
    B, P = prefix.shape
    total = P + num_new_tokens
    masked = (prefix == mask_id).any(0).nonzero()
    first = int(masked[0]) if len(masked) else P  # first position to generate
    start = first - first % block_size  # its block's first position: all before it is context
    denoiser.commit(prefix[:, :start])
    out = prefix[:, :start]
    b = 0
    while out.shape[1] < total:
        width = min(block_size, total - out.shape[1])
        z = torch.full((B, width), mask_id, dtype=torch.long, device=prefix.device)
        fixed = prefix[:, out.shape[1] : out.shape[1] + width]  # prompt tokens inside this block
        z[:, : fixed.shape[1]] = fixed
        on_step = None
        if step_callback is not None:
            def on_step(i: int, z_i: Tensor, _x0: Tensor, b: int = b, done: Tensor = out) -> None:
                step_callback(b * num_steps + i, torch.cat([done, z_i], 1))
        z = ancestral(denoiser.denoise, z, num_steps, mask_id=mask_id, generator=generator, callback=on_step,
                      **block_options)
        out = torch.cat([out, z], 1)
        if callback is not None:
            callback(b, out)
        b += 1
        if stop_id is not None and bool((out[:, P:] == stop_id).any(1).all()):
            break
        if out.shape[1] < total and width == block_size:
            denoiser.commit(z)
    return out

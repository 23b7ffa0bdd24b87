"""Seeded noise: one generator for the batch, or one generator per sample.

With a list of ``B`` generators, sample ``i`` only ever draws from ``generator[i]``, so a batch
equals the same samples drawn one at a time. Numbers are drawn on the generator's device (CPU
for ``torch.Generator()``) and then moved, so a seed gives the same noise on every device.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["GeneratorArg", "randn", "randn_like"]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn(
    shape: Sequence[int],
    generator: GeneratorArg = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal tensor of ``shape`` ``(B, ...)`` from ``None``, a generator, or ``B`` generators."""
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per sample")
    draws = [torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device).to(device) for g in generators]
    return torch.stack(draws)


def randn_like(x: Tensor, generator: GeneratorArg = None) -> Tensor:
    """``randn`` with the shape, dtype and device of ``x``."""
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)

"""Euler ancestral sampling for Gaussian (DDPM-family) models.

The variance-exploding view of a DDPM (Karras et al. 2022, arXiv 2206.00364, Sec. 3 / Table 1):
``x~ = x_t / sqrt(abar_t)`` has noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)`` and
``x~ = x0 + sigma_t eps``. Each step takes an Euler step of the probability-flow ODE
``dx~/dsigma = (x~ - x0) / sigma`` down to ``sigma_down`` and adds fresh noise of scale
``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2`` (the ancestral split of
k-diffusion's ``sample_euler_ancestral``, Crowson 2022). ``eta = 0`` is the deterministic Euler
step, which equals DDIM; ``eta = 1`` (default) is the full ancestral step. The last step goes to
``sigma = 0``: the data.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.noise import GeneratorArg, randn_like

__all__ = ["euler_ancestral"]


@SAMPLERS.register("euler_a", family="gaussian", options=(),
                   summary="Euler ancestral in the VE sigma view of a DDPM (k-diffusion; eta 0 = DDIM)")
@torch.no_grad()
def euler_ancestral(
    denoiser: Callable[[Tensor, Tensor], Any],
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    eta: float = 1.0,
    generator: GeneratorArg = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Euler ancestral sampling from ``x_T`` ``(B, ...)`` at the first (noisiest) index of
    ``timesteps`` (strictly decreasing DDPM indices into ``alphas_cumprod``, a float64 ``(T,)``
    table) to data. ``denoiser(x_t, t (B,) int64)`` returns an object with ``.x0``; ``generator``:
    None, one generator or one per sample; ``callback(i, x_t, x0_pred)`` after each step.
    Raises ``ValueError`` for an empty, unsorted or out-of-range grid."""
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] >= len(alphas_cumprod):
        raise ValueError(f"timesteps must be non-empty, strictly decreasing and within [0, {len(alphas_cumprod) - 1}]")
    abar = alphas_cumprod.double().cpu()
    sigmas = [math.sqrt((1 - abar[t].item()) / abar[t].item()) for t in ts] + [0.0]
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)  # x~ = x_t / sqrt(abar) = x_t sqrt(1 + sigma^2): the VE variable
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_t = x / math.sqrt(1 + sigma**2)  # back to the VP input the network was trained on
        x0 = denoiser(x_t, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).x0
        sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - x0) / sigma * (sigma_down - sigma)  # Euler step of dx~/dsigma = (x~ - x0) / sigma
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        if callback is not None:
            callback(i, x / math.sqrt(1 + sigma_next**2), x0)
    return x

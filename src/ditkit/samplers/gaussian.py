"""Samplers for discrete Gaussian diffusion: DDPM, DDIM, DPM-Solver++(2M).

Time convention: integer ``t in {0, ..., T-1}``, data at ``t = 0``,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. ``timesteps`` is a strictly decreasing list
of the indices to visit (e.g. 250 of 1000); the step after the last one is the data
(``abar = 1``). As in improved-DDPM/DiT respacing, the respaced chain's betas are
``beta_i = 1 - abar_{t_i} / abar_{t_{i+1}}`` and the denoiser is called with the original index.

``denoiser(x_t (B, ...), t_index (B,) int64)`` returns an object with ``x0``, ``eps`` (shape of
``x_t``) and ``var_frac`` (``None``, or the learned interpolation ``f`` in ``[0, 1]``).
``callback(step_index, x, x0_pred)`` is called after each step with the new ``x``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ditkit.samplers.noise import GeneratorArg, randn_like

__all__ = ["ddpm", "ddim", "dpm_solver_pp_2m"]

Denoiser = Callable[[Tensor, Tensor], Any]  # -> GaussianPrediction-like (x0, eps, var_frac)
Callback = Callable[[int, Tensor, Tensor], None]


def _steps(alphas_cumprod: Tensor, timesteps: Sequence[int] | Tensor) -> list[tuple[int, float, float]]:
    """``(t, abar_t, abar_next)`` per step in float64, where ``abar_next`` is the next visited
    index's (1.0 after the last step)."""
    ts = [int(t) for t in timesteps]
    T = len(alphas_cumprod)
    if not ts:
        raise ValueError("timesteps is empty; pass e.g. space_timesteps(1000, 250)")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be strictly decreasing (noise -> data); reverse the list")
    if ts[-1] < 0 or ts[0] >= T:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts[0]}..{ts[-1]}")
    abar = alphas_cumprod.double().cpu()
    return [(t, abar[t].item(), abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def _index(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2), respaced; learned variance (Nichol & Dhariwal 2021, eq. 15)."""
    x = x_T
    steps = _steps(alphas_cumprod, timesteps)
    for i, (t, abar, abar_next) in enumerate(steps):
        pred = denoiser(x, _index(t, x))
        beta = 1.0 - abar / abar_next
        # mean of q(x_next | x_t, x0) for the respaced chain (Ho et al. 2020, eq. 7)
        coef_x0 = beta * math.sqrt(abar_next) / (1 - abar)
        coef_xt = (1 - abar_next) * math.sqrt(1 - beta) / (1 - abar)
        x = coef_x0 * pred.x0 + coef_xt * x
        if i < len(steps) - 1:  # no noise on the step to data
            log_var = math.log(beta * (1 - abar_next) / (1 - abar))  # posterior variance, eq. 7
            if pred.var_frac is None:
                std: Tensor | float = math.exp(0.5 * log_var)
            else:  # interpolate log beta and log posterior variance (Nichol & Dhariwal 2021, eq. 15)
                frac = pred.var_frac
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * log_var)).to(x.dtype)
            x = x + std * randn_like(x, generator)
        if callback is not None:
            callback(i, x, pred.x0)
    return x


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    eta: float = 0.0,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at ``eta = 0``, DDPM-like noise at ``eta = 1``."""
    x = x_T
    for i, (t, abar, abar_next) in enumerate(_steps(alphas_cumprod, timesteps)):
        pred = denoiser(x, _index(t, x))
        sigma = eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))  # eq. 16
        x = math.sqrt(abar_next) * pred.x0 + math.sqrt(max(1 - abar_next - sigma**2, 0.0)) * pred.eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, x, pred.x0)
    return x


@torch.no_grad()
def dpm_solver_pp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep second order in ``lambda = log(alpha/sigma)``
    on the data prediction; the first step, and the last one (to ``sigma = 0``), are first order."""
    x = x_T
    steps = _steps(alphas_cumprod, timesteps)
    x0_prev, h_prev = None, None
    for i, (t, abar, abar_next) in enumerate(steps):
        x0 = denoiser(x, _index(t, x)).x0
        if i == len(steps) - 1:  # to data: sigma_next = 0, the first-order update gives x0 exactly
            x = x0
        else:
            sigma, sigma_next, alpha_next = math.sqrt(1 - abar), math.sqrt(1 - abar_next), math.sqrt(abar_next)
            h = 0.5 * (math.log(abar_next / (1 - abar_next)) - math.log(abar / (1 - abar)))  # lambda_next - lambda
            d = x0
            if x0_prev is not None:  # second-order correction from the previous data prediction
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x, x0)
    return x

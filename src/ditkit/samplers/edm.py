"""Samplers for the EDM noise-scale formulation (Karras et al. 2022, arXiv 2206.00364).

Time convention: noise level ``sigma``, data at ``sigma = 0``; ``x_sigma = x0 + sigma eps`` and the
probability-flow ODE is ``dx/dsigma = (x - D(x; sigma)) / sigma`` (eq. 3 with ``s(t) = 1``,
``sigma(t) = t``). ``denoiser(x (B, ...), sigma (B,) float) -> D(x; sigma)`` (shape of ``x``) is
the x0 estimate. ``sigmas`` is strictly decreasing and ends with 0 (``karras_sigmas``); the step
count is ``len(sigmas) - 1``. ``callback(step_index, x, x0_pred)`` is called after each step with
the new ``x`` and the denoiser's first estimate of the step.

Stochastic churn (Alg. 2): before step ``i`` the noise level is raised from ``sigma_i`` to
``sigma_hat = (1 + gamma_i) sigma_i`` by adding fresh noise of std ``sqrt(sigma_hat^2 - sigma_i^2) S_noise``,
with ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` for ``S_tmin <= sigma_i <= S_tmax`` and 0 elsewhere.
``S_churn = 0`` (the default) is the deterministic sampler (Alg. 1) and draws no noise.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.noise import GeneratorArg, randn_like

__all__ = ["edm_euler", "edm_heun", "karras_sigmas"]

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]
CHURN_OPTIONS = ("S_churn", "S_tmin", "S_tmax", "S_noise")


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``(num_steps + 1,)`` float64 noise levels from ``sigma_max`` down to ``sigma_min``, then 0
    (Karras et al. 2022, eq. 5): ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho``. ``num_steps = 1`` gives ``[sigma_max, 0]``. Raises ``ValueError``
    unless ``num_steps >= 1``, ``0 < sigma_min <= sigma_max`` and ``rho > 0``."""
    if num_steps < 1 or not 0 < sigma_min <= sigma_max or rho <= 0:
        raise ValueError(
            f"need num_steps >= 1, 0 < sigma_min <= sigma_max and rho > 0; got {num_steps}, {sigma_min}, {sigma_max}, {rho}"
        )
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)  # i / (N - 1); [0] when N = 1
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def _sigmas(sigmas: Sequence[float] | Tensor) -> list[float]:
    levels = [float(s) for s in sigmas]
    if len(levels) < 2 or levels[-1] != 0 or any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError("sigmas must hold >= 2 strictly decreasing levels ending with 0; use karras_sigmas(n, ...)")
    return levels


def _level(sigma: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _run(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Sequence[float] | Tensor,
    second_order: bool,
    generator: GeneratorArg,
    callback: Callback | None,
    S_churn: float,
    S_tmin: float,
    S_tmax: float,
    S_noise: float,
) -> Tensor:
    """Karras et al. 2022, Alg. 2 (Alg. 1 when ``S_churn = 0``); Euler only when not ``second_order``."""
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    levels = _sigmas(sigmas)
    num_steps = len(levels) - 1
    x = x_T
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1.0 + gamma)
        if gamma > 0:  # raise the noise level to sigma_hat with fresh noise (Alg. 2, lines 5-6)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * randn_like(x, generator)
        x0_pred = denoiser(x, _level(sigma_hat, x))
        slope = (x - x0_pred) / sigma_hat  # dx/dsigma at sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        if second_order and sigma_next > 0:  # trapezoidal corrector (Alg. 2, lines 9-11)
            slope_next = (x_next - denoiser(x_next, _level(sigma_next, x))) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
        x = x_next
        if callback is not None:
            callback(i, x, x0_pred)
    return x


@SAMPLERS.register(
    "edm_euler", family="edm", options=CHURN_OPTIONS, summary="Euler on the EDM ODE, optional churn (Karras et al. 2022)"
)
@torch.no_grad()
def edm_euler(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
) -> Tensor:
    """Euler steps on ``dx/dsigma = (x - D) / sigma`` with optional churn (Karras et al. 2022, Alg. 2
    without the corrector); first order. ``x_T`` ``(B, ...)`` at ``sigmas[0]``; returns ``x`` at 0."""
    return _run(denoiser, x_T, sigmas, False, generator, callback, S_churn, S_tmin, S_tmax, S_noise)


@SAMPLERS.register(
    "edm_heun", family="edm", options=CHURN_OPTIONS, summary="Heun 2nd order, optional churn (Karras et al. 2022, Alg. 1/2)"
)
@torch.no_grad()
def edm_heun(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method with optional churn (Karras et al. 2022, Alg. 2; Alg. 1 at
    ``S_churn = 0``); the step to ``sigma = 0`` is an Euler step. ``2N - 1`` denoiser calls."""
    return _run(denoiser, x_T, sigmas, True, generator, callback, S_churn, S_tmin, S_tmax, S_noise)

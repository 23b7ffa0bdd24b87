"""Samplers for discrete Gaussian diffusion: DDPM, DDIM, DPM-Solver++(2M) (and the multistep core
that DPM-Solver++(3M) in ``dpm_solver_3m.py`` shares).

Time convention: integer ``t in {0, ..., T-1}``, data at ``t = 0``,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. ``timesteps`` is a strictly decreasing list
of the indices to visit (e.g. 250 of 1000); the step after the last one is the data
(``abar = 1``). As in improved-DDPM/DiT respacing, the respaced chain's betas are
``beta_i = 1 - abar_{t_i} / abar_{t_{i+1}}`` and the denoiser is called with the original index.

DDPM and DDIM call the network at every index of ``timesteps`` (``len(timesteps)`` calls). The
multistep ODE solvers (DPM-Solver++) treat ``timesteps`` as their grid *including the data end*:
a trailing index ``0`` is where the solution is read off (``sigma = 0``), as in the DPM-Solver
papers (the discrete-time end ``t_M = epsilon``, index 0) and diffusers' ``final_sigmas_type="zero"``;
it gets no network call, so ``space_timesteps(T, n + 1)`` gives ``n`` calls (registry meta
``zero_is_data=True``). Stepping to index 0 and then to ``sigma = 0`` instead would take a long
second-order step into index 0 and a nearly empty one after it (issue 14.1).

``denoiser(x_t (B, ...), t_index (B,) int64)`` returns an object with ``x0``, ``eps`` (shape of
``x_t``) and ``var_frac`` (``None``, or the learned interpolation ``f`` in ``[0, 1]``).
``callback(step_index, x, x0_pred)`` is called after each network call with the new ``x``.
Every sampler takes ``generator`` (``None``, one ``torch.Generator`` or one per sample); the
deterministic ones ignore it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.noise import GeneratorArg, randn_like

__all__ = ["ddpm", "ddim", "dpm_solver_pp_2m", "dpm_solver_pp_multistep", "solver_steps"]

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


@SAMPLERS.register("ddpm", family="gaussian", options=())
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


@SAMPLERS.register("ddim", family="gaussian", options=("eta",))
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


def solver_steps(alphas_cumprod: Tensor, timesteps: Sequence[int] | Tensor) -> list[tuple[int, float, float]]:
    """The ODE solvers' steps ``(t, abar_t, abar_next)``, one per network call, the last one to data.

    ``timesteps`` is the grid with its data end: a trailing index ``0`` (after at least one other
    index) is the data point ``abar = 1`` itself, not a call (DPM-Solver, Lu et al. 2022, arXiv
    2206.00927, solves discrete-time models from ``t = 1`` to ``t_M = epsilon = 1/N``, which is
    index 0; diffusers' ``final_sigmas_type="zero"`` maps that point to ``sigma = 0``). Any other
    grid gets its data end appended.
    ``space_timesteps(1000, 26)`` -> 25 calls at 999, 959, ..., 40, then data.
    """
    steps = _steps(alphas_cumprod, timesteps)
    if len(steps) > 1 and steps[-1][0] == 0:
        t, abar, _ = steps[-2]
        steps = steps[:-2] + [(t, abar, 1.0)]
    return steps


def _log_snr(abar: float) -> float:
    """``lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar))``, the DPM-Solver time variable."""
    return 0.5 * math.log(abar / (1.0 - abar))


@torch.no_grad()
def dpm_solver_pp_multistep(
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    order: int = 2,
    callback: Callback | None = None,
) -> Tensor:
    """Multistep DPM-Solver++ of ``order`` 1, 2 or 3 on the data prediction (Lu et al. 2022,
    arXiv 2211.01095, Alg. 2 for 2M; 3M integrates the exponential integrator of arXiv 2206.00927
    with ``x0`` expanded to second order in ``lambda`` from the last three predictions, the update
    of the official code and diffusers), over ``solver_steps`` (one network call per step).

    ``x_T`` ``(B, ...)`` at ``timesteps[0]``; returns the data ``(B, ...)``. The first steps use
    the orders their history allows; near the end the order drops as steps remain
    (``min(order, steps left)``, "lower order final" of the official code), so the last step, to
    ``sigma = 0`` where ``h = lambda_next - lambda`` is infinite, is first order and returns the
    last ``x0`` prediction. Coefficients are float64 Python numbers; ``x`` keeps its dtype.
    Raises ``ValueError`` for a bad grid or an ``order`` outside 1..3.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    steps = solver_steps(alphas_cumprod, timesteps)
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (x0 prediction, lambda) of the latest calls, newest last
    for i, (t, abar, abar_next) in enumerate(steps):
        x0 = denoiser(x, _index(t, x)).x0
        lam = _log_snr(abar)
        history = (history + [(x0, lam)])[-order:]
        if abar_next >= 1.0:  # to data: every order's update reduces to x = x0 as h -> infinity
            x = x0
        else:
            sigma, sigma_next, alpha_next = math.sqrt(1 - abar), math.sqrt(1 - abar_next), math.sqrt(abar_next)
            h = _log_snr(abar_next) - lam
            step_order = min(order, len(history), len(steps) - i)
            phi_1 = -math.expm1(-h)  # 1 - e^{-h}
            if step_order == 1:  # DPM-Solver++(1) = DDIM (eq. 8 of 2211.01095)
                x = (sigma_next / sigma) * x + alpha_next * phi_1 * x0
            elif step_order == 2:  # Alg. 2: D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h
                x0_prev, lam_prev = history[-2]
                r = (lam - lam_prev) / h
                x = (sigma_next / sigma) * x + alpha_next * phi_1 * (x0 + (x0 - x0_prev) / (2 * r))
            else:  # divided differences of the last three x0 in units of h: slope d1, curvature d2
                (x0_2, lam_2), (x0_1, lam_1) = history[-3], history[-2]
                r0, r1 = (lam - lam_1) / h, (lam_1 - lam_2) / h
                slope_0, slope_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = slope_0 + (r0 / (r0 + r1)) * (slope_0 - slope_1)
                d2 = (slope_0 - slope_1) / (r0 + r1)
                phi_2 = 1 - phi_1 / h  # (e^{-h} - 1) / h + 1
                phi_3 = (h - phi_1) / h**2 - 0.5  # (e^{-h} - 1 + h) / h^2 - 1/2
                x = (sigma_next / sigma) * x + alpha_next * (phi_1 * x0 + phi_2 * d1 - phi_3 * d2)
        if callback is not None:
            callback(i, x, x0)
    return x


@SAMPLERS.register("dpm++", family="gaussian", options=(), zero_is_data=True)
@torch.no_grad()
def dpm_solver_pp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep second order in ``lambda = log(alpha/sigma)``.

    ``timesteps`` ends at its data point (a trailing 0 is ``sigma = 0``, see ``solver_steps``):
    ``space_timesteps(T, n + 1)`` makes ``n`` network calls; the first step and the last one (to
    data) are first order. Deterministic: ``generator`` is ignored. Returns ``(B, ...)`` like ``x_T``.
    """
    return dpm_solver_pp_multistep(denoiser, x_T, alphas_cumprod, timesteps, order=2, callback=callback)

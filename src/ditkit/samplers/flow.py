"""ODE samplers for flow matching: Euler and Heun.

Time convention: ``t in [0, 1]``, data at ``t = 0``, noise at ``t = 1``; ``x_t = (1 - t) x0 + t eps``
and ``velocity_fn(x_t (B, ...), t (B,) float) -> dx/dt`` (``eps - x0`` in expectation). ``ts`` is
strictly decreasing from 1 to 0 (``flow_timesteps``). ``callback(step_index, x, x0_pred)`` is called
after each step with the new ``x`` and ``x0_pred = x_t - t v``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS

__all__ = ["euler", "heun", "flow_timesteps"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def flow_timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """``(num_steps + 1,)`` float64 times from 1 to 0, optionally shifted toward noise by
    ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23; ``shift = 1`` is uniform)."""
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"need num_steps >= 1 and shift > 0, got {num_steps}, {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def _times(ts: Sequence[float] | Tensor) -> list[float]:
    times = [float(t) for t in ts]
    if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError("ts must hold >= 2 strictly decreasing times (1 -> 0); use flow_timesteps(n)")
    return times


def _time(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


@SAMPLERS.register("euler", family="flow", options=())
@torch.no_grad()
def euler(
    velocity_fn: VelocityFn,
    x_1: Tensor,
    ts: Sequence[float] | Tensor,
    *,
    generator: object = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler method on the probability-flow ODE ``dx/dt = v(x, t)`` (as in rectified flow, Liu et al. 2023)."""
    x, times = x_1, _times(ts)
    for i, (t, t_next) in enumerate(zip(times, times[1:])):
        v = velocity_fn(x, _time(t, x))
        x0_pred = x - t * v
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, x, x0_pred)
    return x


@SAMPLERS.register("heun", family="flow", options=())
@torch.no_grad()
def heun(
    velocity_fn: VelocityFn,
    x_1: Tensor,
    ts: Sequence[float] | Tensor,
    *,
    generator: object = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the step to ``t = 0`` is a plain Euler step."""
    x, times = x_1, _times(ts)
    for i, (t, t_next) in enumerate(zip(times, times[1:])):
        v = velocity_fn(x, _time(t, x))
        x0_pred = x - t * v
        x_next = x + (t_next - t) * v
        if t_next > 0:  # trapezoidal corrector with the slope at the Euler end point
            x_next = x + (t_next - t) * 0.5 * (v + velocity_fn(x_next, _time(t_next, x)))
        x = x_next
        if callback is not None:
            callback(i, x, x0_pred)
    return x

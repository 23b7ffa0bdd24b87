"""Flow matching / rectified flow objective (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024).

Time convention: continuous ``t in [0, 1]``, data at ``t = 0``, noise at ``t = 1``;
``x_t = (1 - t) x0 + t eps`` and the network regresses the velocity ``dx_t/dt = eps - x0``.
The network is called as ``model(x_t, 1000 * t, y)`` so one DiT serves both objectives on the
DDPM index scale ``[0, 1000)`` (docs/architecture.md).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ditkit.diffusion.schedules import sample_flow_time, sample_noise

__all__ = ["FlowMatching", "FLOW_TIME_SCALE"]

FLOW_TIME_SCALE = 1000.0  # network sees t * 1000, the DDPM index scale


class FlowMatching:
    """Rectified-flow objective with uniform or logit-normal time sampling (SD3, eq. 19).

    Args:
        time_sampling: ``"uniform"`` or ``"logit_normal"``.
        logit_mean, logit_std: ``m`` and ``s`` of the logit-normal density.
    """

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown time_sampling {time_sampling!r}; use 'uniform' or 'logit_normal'")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def loss(
        self,
        model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-sample velocity MSE ``(B,)`` (mean over non-batch dims).

        ``x0`` is ``(B, C, ...)``; ``t`` ``(B,)`` float in ``[0, 1]`` and ``noise`` are drawn
        from ``generator`` unless given.
        """
        if t is None:
            t = sample_flow_time(
                x0.shape[0], self.time_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
                generator=generator, device=x0.device,
            )
        if noise is None:
            noise = sample_noise(x0, generator=generator)
        t_b = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_b) * x0 + t_b * noise
        out = model(x_t, FLOW_TIME_SCALE * t.float(), y).float()
        if out.shape != x0.shape:
            raise ValueError(
                f"model output {tuple(out.shape)} does not match data {tuple(x0.shape)}; flow matching "
                "predicts a velocity only, so build the model with learn_sigma=False"
            )
        return ((out - (noise - x0)) ** 2).flatten(1).mean(1)

    def denoiser(self, net: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """Adapt ``net(x, t_scaled)`` (conditioning bound) to ``velocity_fn(x_t, t (B,) in [0, 1])``."""

        def velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return net(x_t, FLOW_TIME_SCALE * t.float())

        return velocity_fn

"""Flow matching / rectified flow objective (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024).

Time convention: continuous ``t in [0, 1]``, data at ``t = 0``, noise at ``t = 1``;
``x_t = (1 - t) x0 + t eps`` and the network regresses the velocity ``dx_t/dt = eps - x0``.
The network is called as ``model(x_t, 1000 * t, y)`` so one DiT serves both objectives on the
DDPM index scale ``[0, 1000)`` (docs/architecture.md).

``loss_weighting="min_snr"`` weights the velocity MSE by ``min(SNR, gamma) t^2`` with
``SNR = ((1 - t) / t)^2``: the Min-SNR-gamma weight ``min(SNR, gamma)`` of Hang et al. 2023
(arXiv 2303.09556) in x0 units, carried to the velocity (``x0 = x_t - t v``, so the velocity MSE
is the x0 MSE over ``t^2``; ``schedules.min_snr_weight(..., "flow")``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ditkit.diffusion.objective import Objective, masked_mean
from ditkit.diffusion.schedules import (
    LOSS_WEIGHTINGS,
    flow_sampling_times,
    flow_snr,
    min_snr_weight,
    sample_flow_time,
    sample_noise,
    sample_noise_rows,
)
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES

__all__ = ["FlowMatching", "FLOW_TIME_SCALE"]

FLOW_TIME_SCALE = 1000.0  # network sees t * 1000, the DDPM index scale
TIME_SAMPLINGS = ("uniform", "logit_normal")


@OBJECTIVES.register("flow", modality="image", family="flow")
class FlowMatching(Objective):
    """Rectified-flow objective with uniform or logit-normal time sampling (SD3, eq. 19).

    Args:
        time_sampling: ``"uniform"`` or ``"logit_normal"``.
        logit_mean, logit_std: ``m`` and ``s`` of the logit-normal density.
        loss_weighting: ``"none"`` or ``"min_snr"`` (see the module docstring); ``min_snr_gamma``
            is its ``gamma``.

    Raises ``ValueError`` for an unknown ``time_sampling`` or ``loss_weighting``, ``logit_std <= 0``
    or ``min_snr_gamma <= 0``.
    """

    family = "flow"
    default_sampler = "heun"  # what sample.sampler "auto" means

    def __init__(
        self,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; use 'uniform' or 'logit_normal'")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; use one of {LOSS_WEIGHTINGS}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

    @classmethod
    def from_config(cls, cfg: Any, clip_x0: Optional[float] = None) -> FlowMatching:
        """Build from a full ``Config`` (read duck-typed): ``cfg.objective.time_sampling``,
        ``loss_weighting``, ``min_snr_gamma`` (and ``logit_mean`` / ``logit_std`` where the config
        has them). ``clip_x0`` is accepted for a uniform call and ignored: the flow samplers
        integrate the velocity. Raises ``ConfigError`` naming the field to fix."""
        o = cfg.objective
        weighting = getattr(o, "loss_weighting", "none")
        gamma = getattr(o, "min_snr_gamma", 5.0)
        if o.time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"objective.time_sampling={o.time_sampling!r}: flow uses one of {', '.join(TIME_SAMPLINGS)}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"objective.loss_weighting={weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}")
        if weighting == "min_snr" and not gamma > 0:
            raise ConfigError(f"objective.min_snr_gamma={gamma}: use a value > 0 (5 in Hang et al. 2023)")
        logit_std = getattr(o, "logit_std", 1.0)
        if not logit_std > 0:
            raise ConfigError(f"objective.logit_std={logit_std}: use a value > 0")
        return cls(
            time_sampling=o.time_sampling, logit_mean=getattr(o, "logit_mean", 0.0), logit_std=logit_std,
            loss_weighting=weighting, min_snr_gamma=gamma,
        )

    def _draw_times(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        return sample_flow_time(
            batch_size, self.time_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
            generator=generator, device=device,
        )

    def loss_terms(
        self,
        model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample terms ``{"mse", "loss"}``, each ``(B,)``: the velocity MSE (mean over
        non-batch dims, or over ``loss_mask``'s 1s) and the training loss (the MSE, times the
        Min-SNR weight if set).

        ``x0`` is ``(B, C, ...)``; ``t`` ``(B,)`` float in ``[0, 1]`` and ``noise`` are drawn
        from ``generator`` (t first) unless given. Raises ``ValueError`` if the model output's
        shape differs from ``x0``'s.
        """
        if t is None:
            t = self._draw_times(x0.shape[0], generator, x0.device)
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
        mse = masked_mean((out - (noise - x0)) ** 2, loss_mask)
        if self.loss_weighting == "none":
            return {"mse": mse, "loss": mse}
        return {"mse": mse, "loss": self.loss_weights(t).to(mse) * mse}

    def loss_weights(self, t: Tensor) -> Tensor:
        """Weight ``(B,)`` of the velocity MSE at times ``t`` ``(B,)`` in ``[0, 1]``, in ``t``'s
        dtype (float32 at least) on its device: ones for ``"none"``; ``min(SNR, gamma) t^2`` for
        ``"min_snr"``."""
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        if self.loss_weighting == "none":
            return torch.ones_like(t)
        return min_snr_weight(flow_snr(t), self.min_snr_gamma, "flow")

    def global_draws(
        self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The ``t`` ``(b,)`` and ``noise`` ``(b, ...)`` that ``loss`` would draw from ``generator``
        for a global batch of ``global_batch`` samples shaped like ``x`` ``(b, ...)`` (this rank's
        share), cut to ``rows``: the same numbers, in the same order (t, then noise)."""
        t = self._draw_times(global_batch, generator, x.device)
        return {"t": t[rows], "noise": sample_noise_rows(x, global_batch, rows, generator)}

    def denoiser(self, net: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """Adapt ``net(x, t_scaled)`` (conditioning bound) to ``velocity_fn(x_t, t (B,) in [0, 1])``."""

        def velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return net(x_t, FLOW_TIME_SCALE * t.float())

        return velocity_fn

    def sample(
        self,
        sampler: Callable[..., Tensor],
        net: Callable[[Tensor, Tensor], Tensor],
        x_T: Tensor,
        num_steps: int,
        *,
        generator: Optional[Any] = None,
        callback: Optional[Callable[..., None]] = None,
        shift: float = 1.0,
        **options: Any,
    ) -> Tensor:
        """Run a ``"flow"``-family ``sampler`` from ``x_T`` ``(B, C, ...)`` (noise, ``t = 1``) over
        ``flow_sampling_times(num_steps, shift)``; ``options`` go to the sampler. Returns ``x0``."""
        return sampler(self.denoiser(net), x_T, *self.sampling_grid(num_steps, shift=shift), generator=generator,
                       callback=callback, **options)

    def sampling_grid(self, num_steps: int, *, shift: float = 1.0) -> tuple[Tensor]:
        """What a flow sampler takes after ``x_T``: ``(ts,)``, times from 1 to 0 (``num_steps`` steps)."""
        return (flow_sampling_times(num_steps, shift),)

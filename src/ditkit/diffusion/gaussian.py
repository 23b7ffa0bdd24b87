"""DDPM-family objective: eps / v / x0 prediction, optional learned-range variance.

Time convention: integer ``t in {0, ..., T-1}``, data at ``t = 0``;
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. The network is called as
``model(x_t, t.float(), y)`` (the DDPM index as a float, as the official DiT does).

With ``learn_sigma`` the network outputs ``2C`` channels ``[mean_pred, v]`` and the reverse
variance is ``log var = f log(beta_t) + (1 - f) log(posterior_variance_clipped_t)`` with
``f = (v + 1) / 2`` (Nichol & Dhariwal 2021, eq. 15). It is trained with the hybrid loss
``mse + vb`` (ibid. Sec. 3.1; DiT uses it with lambda = 1 at T = 1000), where ``vb`` is the
variational bound term in bits per dimension computed on a stop-gradient mean, so ``vb`` only
trains the variance.

``loss_weighting="min_snr"`` multiplies the ``mse`` term by the Min-SNR-gamma weight of the
prediction kind (Hang et al. 2023, arXiv 2303.09556; ``schedules.min_snr_weight``); ``vb`` is
left unweighted. ``"none"`` is the plain sum above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ditkit.diffusion.objective import Objective, masked_mean
from ditkit.diffusion.schedules import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    GaussianSchedule,
    eps_from_x0,
    make_schedule,
    min_snr_weight,
    prediction_target,
    sample_noise,
    sample_noise_rows,
    sample_timestep_indices,
    snr_from_alphas_cumprod,
    space_timesteps,
    x0_eps_from_prediction,
)
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES

__all__ = ["GaussianDiffusion", "GaussianPrediction", "normal_kl", "discretized_gaussian_log_likelihood"]


@dataclass
class GaussianPrediction:
    """What a Gaussian denoiser returns at ``x_t``; ``x0`` and ``eps`` have the shape of ``x_t``."""

    x0: Tensor
    eps: Tensor
    var_frac: Tensor | None  # f = (v + 1) / 2, shape of x_t; None without learned variance


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: ``(B, ...) -> (B,)``."""
    return x.flatten(1).mean(1)


def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` on ``like``'s device in float32 (float64 if ``like`` is), shaped ``(B, 1, ..., 1)``."""
    if t.device.type == "mps":  # no float64 on MPS
        table = table.float()
    values = table.to(t.device)[t].to(like.device, torch.promote_types(like.dtype, torch.float32))
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of data ``x`` in ``[-1, 1]`` quantised to 256 levels
    under ``N(mean, exp(log_scale)^2)``; the end bins take the tails (Ho et al. 2020, eq. 13).

    Uses the exact normal CDF; the official code uses a tanh approximation of it (differs by <1e-3).
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@OBJECTIVES.register("gaussian", modality="image", family="gaussian")
class GaussianDiffusion(Objective):
    """Discrete Gaussian diffusion objective (Ho et al. 2020; Nichol & Dhariwal 2021).

    Args:
        schedule: the tables, e.g. ``make_schedule("linear", 1000)``.
        prediction: what the network's mean channels predict: ``"eps"``, ``"v"`` or ``"x0"``.
        learn_sigma: the network also outputs ``C`` variance-interpolation channels (hybrid loss).
        clip_x0: if set, the denoiser clamps predicted ``x0`` to ``[-clip_x0, clip_x0]`` (pixel
            models; the official DiT samples latents without clipping, the default).
        loss_weighting: ``"none"`` or ``"min_snr"`` (weight of the ``mse`` term per timestep,
            ``schedules.min_snr_weight``); ``min_snr_gamma`` is its ``gamma`` (5 in the paper).

    Raises ``ValueError`` for an unknown ``prediction`` or ``loss_weighting``, or ``min_snr_gamma <= 0``.
    """

    family = "gaussian"
    default_sampler = "dpm++"  # what sample.sampler "auto" means
    timestep_spacings = ("uniform", "quadratic")  # space_timesteps spacings that ``sample`` takes

    def __init__(
        self,
        schedule: GaussianSchedule,
        prediction: str = "eps",
        learn_sigma: bool = False,
        clip_x0: float | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; use one of {LOSS_WEIGHTINGS}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.schedule = schedule
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.clip_x0 = clip_x0
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

    @classmethod
    def from_config(cls, cfg: Any, clip_x0: Optional[float] = None) -> GaussianDiffusion:
        """Build from a full ``Config`` (read duck-typed): ``cfg.objective.schedule``,
        ``num_timesteps``, ``prediction``, ``learn_sigma``, ``loss_weighting``, ``min_snr_gamma``.
        ``clip_x0`` is the sampling clamp of the denoiser (the caller resolves ``objective.clip_x0``;
        None: no clamp). Raises ``ConfigError`` naming the field to fix."""
        o = cfg.objective
        weighting = getattr(o, "loss_weighting", "none")
        gamma = getattr(o, "min_snr_gamma", 5.0)
        if weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"objective.loss_weighting={weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}")
        if weighting == "min_snr" and not gamma > 0:
            raise ConfigError(f"objective.min_snr_gamma={gamma}: use a value > 0 (5 in Hang et al. 2023)")
        try:
            schedule = make_schedule(o.schedule, o.num_timesteps)
        except ValueError as err:
            raise ConfigError(f"objective.schedule={o.schedule!r}, num_timesteps={o.num_timesteps}: {err}") from None
        if o.prediction not in PREDICTIONS:
            raise ConfigError(f"objective.prediction={o.prediction!r}: use one of {', '.join(PREDICTIONS)}")
        return cls(
            schedule, prediction=o.prediction, learn_sigma=o.learn_sigma, clip_x0=clip_x0,
            loss_weighting=weighting, min_snr_gamma=gamma,
        )

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def alphas_cumprod(self) -> Tensor:
        """float64 ``(T,)`` table the samplers take."""
        return self.schedule.alphas_cumprod

    def _split(self, out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Split raw output ``(B, C or 2C, ...)`` into the mean prediction and ``v`` (or None)."""
        expected = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != expected:
            raise ValueError(
                f"model returned {out.shape[1]} channels for {channels}-channel data, expected {expected}; "
                f"build the model with learn_sigma={self.learn_sigma} to match the objective"
            )
        if not self.learn_sigma:
            return out, None
        mean_out, v = out.split(channels, dim=1)
        return mean_out, v

    def _model_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """Learned-range log variance, Nichol & Dhariwal 2021 eq. 15: ``f log beta + (1-f) log beta~``."""
        frac = (v + 1) / 2
        max_log = _at(torch.log(self.schedule.betas), t, v)
        min_log = _at(self.schedule.posterior_log_variance_clipped, t, v)
        return frac * max_log + (1 - frac) * min_log

    def _posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x0)`` (Ho et al. 2020, eq. 7)."""
        s = self.schedule
        return _at(s.posterior_mean_coef1, t, x_t) * x0 + _at(s.posterior_mean_coef2, t, x_t) * x_t

    def vb_bits(self, mean_out: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Variational-bound term ``(B,)`` in bits per dimension for one step ``t`` ``(B,)`` int64.

        ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the discretised
        decoder NLL ``-log p(x0 | x_1)`` at ``t = 0`` (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021
        eqs. 4-5). Gradients flow through whatever is not detached by the caller.
        """
        alpha_bar = _at(self.schedule.alphas_cumprod, t, x_t)
        x0_pred, _ = x0_eps_from_prediction(mean_out, x_t, alpha_bar, self.prediction)
        model_mean = self._posterior_mean(x0_pred, x_t, t)
        model_log_var = self._model_log_variance(v, t)
        true_mean = self._posterior_mean(x0, x_t, t)
        true_log_var = _at(self.schedule.posterior_log_variance_clipped, t, x_t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

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
        """Per-sample terms ``{"mse", "vb", "loss"}``, each ``(B,)``; ``vb`` is zero without learned sigma.
        ``loss_mask``: the ``mse`` averages over its 1s only (``masked_mean``; not with learned sigma).

        ``x0`` is ``(B, C, ...)``; ``t`` ``(B,)`` int64 (default uniform over ``0..T-1``) and
        ``noise`` (default standard normal) are drawn from ``generator`` unless given.
        """
        if t is None:
            t = sample_timestep_indices(x0.shape[0], self.num_timesteps, generator=generator, device=x0.device)
        if noise is None:
            noise = sample_noise(x0, generator=generator)
        alpha_bar = _at(self.schedule.alphas_cumprod, t, x0)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        out = model(x_t, t.float(), y).float()
        mean_out, v = self._split(out, x0.shape[1])
        mse = masked_mean((prediction_target(x0, noise, alpha_bar, self.prediction) - mean_out) ** 2, loss_mask)
        if v is not None and loss_mask is not None:
            raise ValueError("a loss mask (MaskDiT) does not combine with learned sigma: set objective.learn_sigma=false")
        if v is None:
            vb = torch.zeros_like(mse)
        else:  # stop-gradient on the mean: vb trains only the variance (Nichol & Dhariwal 2021, Sec. 3.1)
            vb = self.vb_bits(mean_out.detach(), v, x0, x_t, t)
        if self.loss_weighting == "none":
            return {"mse": mse, "vb": vb, "loss": mse + vb}
        weight = self.loss_weights(t, like=mse)  # (B,)
        return {"mse": mse, "vb": vb, "loss": weight * mse + vb}

    def loss_weights(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """Weight ``(B,)`` of the ``mse`` term at timesteps ``t`` ``(B,)`` int64 (all ones for
        ``loss_weighting="none"``), computed in float64 from ``alphas_cumprod`` and returned on
        ``like``'s device in its dtype (float32 at least; default: float64 on ``t``'s device)."""
        snr = snr_from_alphas_cumprod(self.schedule.alphas_cumprod)
        if self.loss_weighting == "none":
            table = torch.ones_like(snr)
        else:
            table = min_snr_weight(snr, self.min_snr_gamma, self.prediction)
        if like is None:
            return table.to(t.device)[t]
        return _at(table, t, like).reshape(-1)  # the table lookup on the device, as for abar

    def global_draws(
        self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The ``t`` ``(b,)`` int64 and ``noise`` ``(b, ...)`` that ``loss`` would draw from
        ``generator`` for a global batch of ``global_batch`` samples shaped like ``x`` ``(b, ...)``
        (this rank's share), cut to ``rows``: the same numbers, in the same order (t, then noise)."""
        t = sample_timestep_indices(global_batch, self.num_timesteps, generator=generator, device=x.device)
        return {"t": t[rows], "noise": sample_noise_rows(x, global_batch, rows, generator)}

    def sample(
        self,
        sampler: Callable[..., Tensor],
        net: Callable[[Tensor, Tensor], Tensor],
        x_T: Tensor,
        num_steps: int,
        *,
        generator: Optional[Any] = None,
        callback: Optional[Callable[..., None]] = None,
        timestep_spacing: str = "uniform",
        zero_is_data: bool = False,
        **options: Any,
    ) -> Tensor:
        """Run a ``"gaussian"``-family ``sampler`` from ``x_T`` ``(B, C, ...)`` over
        ``space_timesteps(num_timesteps, num_steps, timestep_spacing)``; ``options`` (e.g. ``eta``)
        go to the sampler. ``zero_is_data``: the sampler treats a trailing index 0 as the data end
        (``sigma = 0``, no network call; the DPM-Solver grid), so the grid gets one more point and
        ``num_steps`` stays the number of network calls. Returns ``x0`` with the shape of ``x_T``."""
        grid = self.sampling_grid(num_steps, timestep_spacing=timestep_spacing, zero_is_data=zero_is_data)
        return sampler(self.denoiser(net), x_T, *grid, generator=generator, callback=callback, **options)

    def sampling_grid(
        self, num_steps: int, *, timestep_spacing: str = "uniform", zero_is_data: bool = False
    ) -> tuple[Tensor, list[int]]:
        """What a gaussian sampler takes after ``x_T``: ``(alphas_cumprod, timesteps)``, the
        timesteps respaced to ``num_steps`` network calls (plus the data end for ``zero_is_data``
        samplers). Inpainting and image-to-image wrap the sampler with this grid."""
        return self.alphas_cumprod, space_timesteps(self.num_timesteps, num_steps + int(zero_is_data), timestep_spacing)

    def denoiser(self, net: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], GaussianPrediction]:
        """Adapt ``net(x, t_float) -> raw output`` (conditioning bound) to the sampler interface.

        Returns ``fn(x_t (B, C, ...), t_index (B,) int64) -> GaussianPrediction``.
        """

        def fn(x_t: Tensor, t_index: Tensor) -> GaussianPrediction:
            out = net(x_t, t_index.float())
            mean_out, v = self._split(out, x_t.shape[1])
            alpha_bar = _at(self.schedule.alphas_cumprod, t_index, x_t)
            x0, eps = x0_eps_from_prediction(mean_out, x_t, alpha_bar, self.prediction)
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
                eps = eps_from_x0(x_t, x0, alpha_bar)
            return GaussianPrediction(x0=x0, eps=eps, var_frac=None if v is None else (v + 1) / 2)

        return fn

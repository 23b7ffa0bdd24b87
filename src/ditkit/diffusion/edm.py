"""EDM objective: noise-scale diffusion with preconditioning (Karras et al. 2022, arXiv 2206.00364).

Time convention: continuous noise level ``sigma >= 0``, data at ``sigma = 0``;
``x_sigma = x0 + sigma eps`` (Table 1, "VE"-style scaling ``s(t) = 1``). The denoiser is

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

with (Table 1, "Network and preconditioning", ``sd = sigma_data``)

    c_skip = sd^2 / (sigma^2 + sd^2)      c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4

Training draws ``ln sigma ~ N(P_mean, P_std^2)`` and minimises
``lambda(sigma) ||D(x_sigma; sigma) - x0||^2`` with ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``
(= ``1 / c_out^2``), i.e. the plain MSE of ``F`` against the unit-variance target
``(x0 - c_skip x_sigma) / c_out`` (Sec. 5, eq. 8), which is how it is computed here.

The network ``F`` is ditkit's DiT ``model(x, t, y)`` whose ``t`` lives on the DDPM index scale
``[0, 1000)`` (docs/architecture.md). ``c_noise`` is carried there by a fixed affine map,
independent of the config so a checkpoint means the same thing under any sampling sigmas::

    t = EDM_TIME_SCALE * (c_noise + EDM_TIME_SHIFT) = 62.5 ln(sigma) + 400

so ``sigma = 1`` sits at ``t = 400``, the default ``sigma_min = 0.002`` at ``t ~ 12`` and
``sigma_max = 80`` at ``t ~ 674``; ``[0, 1000)`` holds ``sigma`` in ``[0.0017, 14765)``. One unit of
``t`` is 0.016 in ``ln sigma``; the full sampling range spans ~660 units, as DDPM's spans 1000.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ditkit.diffusion.objective import Objective, masked_mean
from ditkit.diffusion.schedules import karras_sigmas, sample_log_normal_sigma, sample_noise, sample_noise_rows
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES

__all__ = ["EDM", "EDM_TIME_SCALE", "EDM_TIME_SHIFT", "edm_network_time"]

EDM_TIME_SCALE = 250.0  # network t = 250 (c_noise + 1.6) = 62.5 ln(sigma) + 400
EDM_TIME_SHIFT = 1.6


def edm_network_time(sigma: Tensor) -> Tensor:
    """The DiT time input ``(B,)`` for noise levels ``sigma`` ``(B,)`` > 0:
    ``250 (c_noise + 1.6)`` with ``c_noise = ln(sigma) / 4`` (see the module docstring)."""
    return EDM_TIME_SCALE * (torch.log(sigma) / 4 + EDM_TIME_SHIFT)


@OBJECTIVES.register("edm", modality="image", family="edm")
class EDM(Objective):
    """EDM training objective and denoiser (Karras et al. 2022, Table 1, config F's preconditioning).

    Args:
        sigma_min, sigma_max: the sampling range (the Karras grid's ends; ``prior`` is scaled by
            ``sigma_max``). Defaults 0.002 and 80 (paper).
        sigma_data: standard deviation of the data (0.5 for images in ``[-1, 1]``).
        p_mean, p_std: mean and standard deviation of ``ln sigma`` during training (-1.2, 1.2).
        rho: the Karras grid's exponent (7).

    Raises ``ValueError`` unless ``0 < sigma_min <= sigma_max``, ``sigma_data > 0``, ``p_std > 0``, ``rho > 0``.
    """

    family = "edm"
    default_sampler = "edm_heun"  # what sample.sampler "auto" means (Karras et al. 2022, Alg. 1)

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        rho: float = 7.0,
    ) -> None:
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0 or p_std <= 0 or rho <= 0:
            raise ValueError(f"sigma_data, p_std and rho must be > 0, got {sigma_data}, {p_std}, {rho}")
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.p_mean, self.p_std, self.rho = p_mean, p_std, rho

    @classmethod
    def from_config(cls, cfg: Any, clip_x0: Optional[float] = None) -> EDM:
        """Build from a full ``Config`` (read duck-typed): ``cfg.objective.sigma_min``, ``sigma_max``,
        ``sigma_data``, ``p_mean``, ``p_std``. ``clip_x0`` is accepted for a uniform call and ignored.
        Raises ``ConfigError`` naming the field to fix."""
        o = cfg.objective
        sigma_min, sigma_max = float(o.sigma_min), float(o.sigma_max)
        if not 0 < sigma_min <= sigma_max:
            raise ConfigError(
                f"objective.sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min <= sigma_max (paper: 0.002, 80)"
            )
        for name in ("sigma_data", "p_std"):
            if not float(getattr(o, name)) > 0:
                raise ConfigError(f"objective.{name}={getattr(o, name)}: use a value > 0 (paper: sigma_data 0.5, p_std 1.2)")
        if getattr(o, "loss_weighting", "none") != "none":
            raise ConfigError(
                f"objective.loss_weighting={o.loss_weighting!r} does not apply to edm (its weight is lambda(sigma)): use none"
            )
        return cls(sigma_min, sigma_max, float(o.sigma_data), float(o.p_mean), float(o.p_std))

    # ---- preconditioning (Table 1) -------------------------------------------------------------

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)``, each the shape of ``sigma`` (any shape, > 0)."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(), torch.log(sigma) / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, shape of ``sigma``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def _forward(self, net: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(F, c_skip, c_out)`` with the coefficients shaped ``(B, 1, ..., 1)`` in ``x``'s float
        dtype; ``net(c_in x, t)`` is called with ``t = edm_network_time(sigma)``."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        s = sigma.to(x.device, dtype).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in, _ = self.preconditioning(s)
        out = net((c_in * x).to(x.dtype), edm_network_time(sigma.to(x.device, dtype)).float())
        if out.shape != x.shape:
            raise ValueError(
                f"model output {tuple(out.shape)} does not match data {tuple(x.shape)}; EDM predicts one "
                "value per input channel, so build the model with learn_sigma=False"
            )
        return out.to(dtype), c_skip, c_out

    # ---- training ------------------------------------------------------------------------------

    def loss_terms(
        self,
        model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample terms, each ``(B,)``: ``"loss"`` = ``lambda(sigma) ||D(x_sigma; sigma) - x0||^2``
        (mean over non-batch dims, or over ``loss_mask``'s 1s) and ``"mse_x0"`` = ``||D - x0||^2`` unweighted.

        ``x0`` is ``(B, C, ...)``; ``sigma`` ``(B,)`` (log-normal) and ``noise`` (standard normal,
        shape of ``x0``) are drawn from ``generator`` in that order unless given.
        """
        if sigma is None:
            sigma = sample_log_normal_sigma(x0.shape[0], self.p_mean, self.p_std, generator=generator, device=x0.device)
        if noise is None:
            noise = sample_noise(x0, generator=generator)
        s = sigma.to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        x_sigma = x0 + s * noise
        out, c_skip, c_out = self._forward(lambda x, t: model(x, t, y), x_sigma, sigma)
        # lambda ||c_skip x + c_out F - x0||^2 = ||F - (x0 - c_skip x) / c_out||^2 since lambda = 1 / c_out^2
        target = (x0 - c_skip * x_sigma) / c_out
        loss = masked_mean((out - target) ** 2, loss_mask)
        mse_x0 = masked_mean((c_skip * x_sigma + c_out * out - x0) ** 2, loss_mask).detach()
        return {"loss": loss, "mse_x0": mse_x0}

    def global_draws(
        self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The ``sigma`` ``(b,)`` and ``noise`` ``(b, ...)`` that ``loss`` would draw from ``generator``
        for a global batch of ``global_batch`` samples shaped like ``x`` ``(b, ...)`` (this rank's
        share), cut to ``rows``: the same numbers, in the same order (sigma, then noise)."""
        sigma = sample_log_normal_sigma(global_batch, self.p_mean, self.p_std, generator=generator, device=x.device)
        return {"sigma": sigma[rows], "noise": sample_noise_rows(x, global_batch, rows, generator)}

    # ---- sampling ------------------------------------------------------------------------------

    def denoiser(self, net: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """Adapt ``net(x, t)`` (conditioning bound; ``t`` on the DDPM index scale) to
        ``D(x (B, C, ...), sigma (B,) > 0) -> x0 estimate`` (shape of ``x``; float32 or wider)."""

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            out, c_skip, c_out = self._forward(net, x, sigma)
            return c_skip * x + c_out * out

        return fn

    def prior(
        self, shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str = "cpu"
    ) -> Tensor:
        """``x_T = sigma_max n`` of shape ``shape``, ``n`` standard normal with row ``i`` drawn from
        ``generators[i]`` (Karras et al. 2022, Alg. 1 line 1)."""
        return super().prior(shape, generators, device) * self.sigma_max

    def sigmas(self, num_steps: int) -> Tensor:
        """The sampling grid ``(num_steps + 1,)`` float64: Karras sigmas from ``sigma_max`` to
        ``sigma_min`` with ``rho``, then 0 (eq. 5)."""
        return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)

    def sample(
        self,
        sampler: Callable[..., Tensor],
        net: Callable[[Tensor, Tensor], Tensor],
        x_T: Tensor,
        num_steps: int,
        *,
        generator: Optional[Any] = None,
        callback: Optional[Callable[..., None]] = None,
        **options: Any,
    ) -> Tensor:
        """Run an ``"edm"``-family ``sampler`` from ``x_T`` ``(B, C, ...)`` (``prior``: noise at
        ``sigma_max``) over ``sigmas(num_steps)``; ``options`` (``S_churn`` ...) go to the sampler.
        ``num_steps`` counts the sigma intervals (Heun: ``2 num_steps - 1`` network calls)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return sampler(self.denoiser(net), x_T, *self.sampling_grid(num_steps), generator=generator, callback=callback,
                       **options)

    def sampling_grid(self, num_steps: int) -> tuple[Tensor]:
        """What an edm sampler takes after ``x_T``: ``(sigmas,)``, Karras sigmas then 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return (self.sigmas(num_steps),)

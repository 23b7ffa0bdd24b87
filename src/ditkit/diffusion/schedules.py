"""Noise schedules and the small pure functions the objectives share.

Time convention (docs/architecture.md): data is at ``t = 0``, noise at the far end.

- Gaussian (DDPM family): integer ``t in {0, ..., T-1}``;
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``abar_t = prod_{s<=t} (1 - beta_s)``.
- Flow matching: continuous ``t in [0, 1]``; ``x_t = (1 - t) x0 + t eps``.
- EDM (noise scale): continuous ``sigma >= 0``; ``x_sigma = x0 + sigma eps`` (data at ``sigma = 0``).

Tables (betas, alphas_cumprod, posterior terms) are float64 ``(T,)`` tensors, as in the
official DiT / improved-DDPM code, which computes them in float64 numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "linear_betas",
    "cosine_betas",
    "GaussianSchedule",
    "make_schedule",
    "space_timesteps",
    "x0_from_eps",
    "eps_from_x0",
    "v_from_x0_eps",
    "x0_from_v",
    "eps_from_v",
    "x0_eps_from_prediction",
    "prediction_target",
    "sample_timestep_indices",
    "sample_flow_time",
    "sample_noise",
    "sample_noise_rows",
    "LOSS_WEIGHTINGS",
    "snr_from_alphas_cumprod",
    "min_snr_weight",
    "flow_snr",
    "flow_sampling_times",
    "karras_sigmas",
    "sample_log_normal_sigma",
]

PREDICTIONS = ("eps", "v", "x0")


# ----------------------------------------------------------------------------- betas


def linear_betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """Linear betas from ``start`` to ``end`` (Ho et al. 2020, Sec. 4). Returns float64 ``(T,)``.

    ``make_schedule("linear", T)`` rescales ``start``/``end`` by ``1000 / T`` as improved-DDPM
    does, so the schedule keeps its shape for any ``T``; this function uses them as given.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 0.0 < start <= end < 1.0:
        raise ValueError(f"need 0 < start <= end < 1, got start={start}, end={end}")
    return torch.linspace(start, end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17). Returns float64 ``(T,)``.

    ``abar(u) = cos(((u + s) / (1 + s)) * pi / 2) ** 2`` for ``u = t / T`` and
    ``beta_t = min(1 - abar((t + 1) / T) / abar(t / T), max_beta)``.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class GaussianSchedule:
    """The float64 ``(T,)`` tables of a discrete Gaussian diffusion; build with ``from_betas``.

    Index ``t`` is the DDPM step (0 = least noise). Posterior ``q(x_{t-1} | x_t, x0)`` is
    ``N(coef1_t x0 + coef2_t x_t, posterior_variance_t)`` (Ho et al. 2020, eqs. 6-7).
    """

    betas: Tensor
    alphas_cumprod: Tensor  # abar_t = prod_{s<=t} (1 - beta_s)
    alphas_cumprod_prev: Tensor  # abar_{t-1}, with abar_{-1} = 1
    posterior_variance: Tensor  # beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0
    posterior_log_variance_clipped: Tensor  # log posterior_variance with t=0 set to the t=1 value
    posterior_mean_coef1: Tensor  # beta_t sqrt(abar_{t-1}) / (1 - abar_t)      (multiplies x0)
    posterior_mean_coef2: Tensor  # (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)  (multiplies x_t)

    @classmethod
    def from_betas(cls, betas: Tensor) -> GaussianSchedule:
        """Derive every table from ``betas`` ``(T,)`` in (0, 1]."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        return cls(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            posterior_variance=post_var,
            # posterior_variance[0] is 0; improved-DDPM clips the log by reusing the t=1 value.
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * abar_prev.sqrt() / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        )

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def make_schedule(name: str = "linear", T: int = 1000) -> GaussianSchedule:
    """Named schedule: ``"linear"`` (1e-4 -> 0.02, rescaled by 1000/T as improved-DDPM) or ``"cosine"``."""
    if name == "linear":
        scale = 1000.0 / T
        return GaussianSchedule.from_betas(linear_betas(T, scale * 1e-4, scale * 0.02))
    if name == "cosine":
        return GaussianSchedule.from_betas(cosine_betas(T))
    raise ValueError(f"unknown schedule {name!r}; use 'linear' or 'cosine'")


def space_timesteps(T: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """``num_steps`` distinct indices of ``0..T-1``, *decreasing*, first ``T-1`` and last ``0``.

    ``spacing="uniform"``: the official DiT / improved-DDPM ``space_timesteps(T, "250")`` indices
    (stride ``(T-1)/(n-1)``, positions accumulated and rounded with Python's ``round``), returned
    in the decreasing order the samplers walk. ``spacing="quadratic"``: ``(T-1) (i/(n-1))^2``,
    denser near the data (Song et al. 2021, DDIM App. D.2); few-step DDIM / DPM-Solver++ do better
    with it than with uniform spacing, whose last steps are long in log-SNR. ``num_steps = 1``
    gives ``[T-1]``.
    """
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, T={T}], got {num_steps}")
    if num_steps == 1:
        return [T - 1]
    if spacing == "uniform":
        stride = (T - 1) / (num_steps - 1)
        taken, position = [], 0.0
        for _ in range(num_steps):  # accumulate like the official code so rounding ties agree
            taken.append(round(position))
            position += stride
    elif spacing == "quadratic":
        taken = []
        for i in range(num_steps):  # keep indices distinct where the parabola is flatter than 1 step
            taken.append(max(round((T - 1) * (i / (num_steps - 1)) ** 2), taken[-1] + 1 if taken else 0))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use 'uniform' or 'quadratic'")
    return sorted(set(taken), reverse=True)


# ----------------------------------------------------------------------------- eps / x0 / v
# ``alpha_bar`` is abar_t broadcastable against x (e.g. (B, 1, 1, 1)) or a float.
# v-prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4 / App. D).


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``v = sqrt(abar) eps - sqrt(1 - abar) x0``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``eps = sqrt(1 - abar) x_t + sqrt(abar) v``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v


def x0_eps_from_prediction(
    output: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str
) -> tuple[Tensor, Tensor]:
    """Turn a network ``output`` of kind ``prediction`` ("eps", "v" or "x0") into ``(x0, eps)``."""
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha_bar), output
    if prediction == "v":
        return x0_from_v(x_t, output, alpha_bar), eps_from_v(x_t, output, alpha_bar)
    if prediction == "x0":
        return output, eps_from_x0(x_t, output, alpha_bar)
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")


def prediction_target(x0: Tensor, eps: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """The regression target for a network that predicts ``prediction`` ("eps", "v" or "x0")."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_from_x0_eps(x0, eps, alpha_bar)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")


# ----------------------------------------------------------------------------- random draws
# Draws happen on the generator's device (CPU by default) and are then moved, so a seed gives
# the same numbers on every device.


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def sample_timestep_indices(
    batch_size: int, T: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """Uniform integer timesteps ``(B,)`` int64 in ``{0, ..., T-1}``."""
    device = torch.device(device)
    t = torch.randint(0, T, (batch_size,), generator=generator, device=_device_of(generator, device))
    return t.to(device)


def sample_flow_time(
    batch_size: int,
    kind: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Flow-matching times ``(B,)`` float32 in ``(0, 1)`` (data at 0, noise at 1).

    ``kind="uniform"``: ``t ~ U(0, 1)``. ``kind="logit_normal"``: ``t = sigmoid(m + s n)`` with
    ``n ~ N(0, 1)``, the logit-normal density of Esser et al. 2024 (SD3), eq. 19.
    """
    device = torch.device(device)
    draw_on = _device_of(generator, device)
    if kind == "uniform":
        t = torch.rand(batch_size, generator=generator, device=draw_on)
    elif kind == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator, device=draw_on))
    else:
        raise ValueError(f"unknown flow time sampling {kind!r}; use 'uniform' or 'logit_normal'")
    return t.to(device)


def sample_noise(like: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise with the shape, dtype and device of ``like``."""
    draw_on = _device_of(generator, like.device)
    return torch.randn(like.shape, generator=generator, device=draw_on, dtype=like.dtype).to(like.device)


def sample_noise_rows(x: Tensor, global_batch: int, rows: slice, generator: torch.Generator) -> Tensor:
    """Rows ``rows`` of the ``sample_noise`` draw for a batch ``(global_batch, *x.shape[1:])`` in
    ``x``'s dtype, moved to ``x``'s device: what one process of a data-parallel run keeps of the
    noise ``loss`` draws for the whole global batch (``x`` is its share ``(b, ...)``).

    ``sample_noise`` draws on the generator's device and moves the result; drawing the whole batch
    there and moving only these rows gives the same numbers with less traffic."""
    like = torch.empty((global_batch, *x.shape[1:]), dtype=x.dtype, device=generator.device)
    return sample_noise(like, generator=generator)[rows].to(x.device)


# ----------------------------------------------------------------------------- loss weighting
# Signal-to-noise ratio SNR = signal^2 / noise^2 of x_t = signal x0 + noise eps.

LOSS_WEIGHTINGS = ("none", "min_snr")


def snr_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """``SNR_t = abar_t / (1 - abar_t)`` of a Gaussian schedule; same shape and dtype as the input."""
    return alphas_cumprod / (1 - alphas_cumprod)


def flow_snr(t: Tensor) -> Tensor:
    """``SNR(t) = ((1 - t) / t)^2`` of ``x_t = (1 - t) x0 + t eps``, ``t`` in ``(0, 1]``."""
    return ((1 - t) / t) ** 2


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, arXiv 2303.09556, Sec. 3.4) for the MSE of a
    network predicting ``prediction``; elementwise in ``snr`` (any shape, e.g. ``(B,)``).

    In x0 units the weight is ``min(SNR, gamma)``; the MSE of an eps prediction equals the x0 MSE
    times ``1 / SNR`` and that of a v prediction times ``1 / (SNR + 1)``, so the weights are:

    * ``"x0"``: ``min(SNR, gamma)``
    * ``"eps"``: ``min(SNR, gamma) / SNR``
    * ``"v"``: ``min(SNR, gamma) / (SNR + 1)``
    * ``"flow"`` (rectified-flow velocity ``eps - x0``, whose MSE is the x0 MSE times
      ``1 / t^2 = (1 + sqrt(SNR))^2``): ``min(SNR, gamma) / (1 + sqrt(SNR))^2``.

    ``snr = inf`` (no noise) gives the limits ``0`` (eps), ``0`` (v), ``gamma`` (x0), ``0`` (flow).
    Raises ``ValueError`` for an unknown ``prediction`` or ``gamma <= 0``.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction == "x0":
        return clipped
    if prediction == "eps":
        return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / snr)
    if prediction == "v":
        return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / (snr + 1))
    if prediction == "flow":
        return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / (1 + snr.sqrt()) ** 2)
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS + ('flow',)}")


# ----------------------------------------------------------------------------- sampling grids
# diffusion/ may not import samplers/ (docs/architecture.md), so the objectives build their
# sampling grids here; tests/test_objective_interface.py checks them against the samplers' own.


def flow_sampling_times(num_steps: int, shift: float = 1.0) -> Tensor:
    """``(num_steps + 1,)`` float64 flow-matching times from 1 to 0; ``shift`` moves them toward
    noise by ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23). The same numbers
    as ``ditkit.samplers.flow.flow_timesteps``. Raises ``ValueError`` for ``num_steps < 1`` or
    ``shift <= 0``."""
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"need num_steps >= 1 and shift > 0, got {num_steps}, {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``(num_steps + 1,)`` float64 noise levels, decreasing, ending with 0 (Karras et al. 2022,
    eq. 5): ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i < N = num_steps``, then ``sigma_N = 0``. ``num_steps = 1`` gives ``[sigma_max, 0]``.
    The same numbers as ``ditkit.samplers.edm.karras_sigmas``. Raises ``ValueError`` unless
    ``num_steps >= 1``, ``0 < sigma_min <= sigma_max`` and ``rho > 0``."""
    if num_steps < 1 or not 0 < sigma_min <= sigma_max or rho <= 0:
        raise ValueError(
            f"need num_steps >= 1, 0 < sigma_min <= sigma_max and rho > 0; got {num_steps}, {sigma_min}, {sigma_max}, {rho}"
        )
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)  # i / (N - 1); [0] when N = 1
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def sample_log_normal_sigma(
    batch_size: int,
    p_mean: float,
    p_std: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """EDM training noise levels ``(B,)`` float32: ``ln sigma ~ N(p_mean, p_std^2)`` (Karras et al.
    2022, Table 1, "noise distribution"); one ``randn`` of ``B`` numbers on the generator's device."""
    device = torch.device(device)
    n = torch.randn(batch_size, generator=generator, device=_device_of(generator, device))
    return torch.exp(p_mean + p_std * n).to(device)

"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): a student learns to take in one
DDIM step what its teacher takes in two.

One round (Alg. 2 of the paper, discrete-time): the teacher samples with DDIM (eta = 0) on the grid
of ``2N`` steps, the student on the grid of ``N`` steps, each student step spanning two teacher
steps. For a training image ``x`` and a student step ``t -> t''`` drawn uniformly from the student's
grid::

    z_t   = alpha_t x + sigma_t eps                               (alpha = sqrt(abar), sigma = sqrt(1 - abar))
    z_t'  = DDIM_teacher(z_t,  t  -> t')                          (the teacher grid's midpoint)
    z_t'' = DDIM_teacher(z_t', t' -> t'')
    x~    = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (eq. 8 of Alg. 2)
    loss  = max(SNR_t, 1) * mean((x~ - x^_student(z_t, t))^2)    ("truncated SNR" weighting, Sec. 5;
                                                                   eps students: SNR_t, see loss_weight)

``x~`` is the x0 prediction that makes ONE DDIM step from ``z_t`` land exactly on the teacher's
``z_t''`` (on the last step ``t''`` is the data and ``x~ = z_t''``). The student starts as a copy of
the teacher (``train.init_from``); the next round's teacher is this round's student.

The grid. A round's steps must nest: the student's ``N``-step grid is every other point of the
teacher's ``2N``-step grid. ``space_timesteps(T, n)`` with "uniform" spacing does not nest
(``n = 4``: 999, 666, 333, 0; ``n = 8``: 999, 856, ...), but the grid of ``n`` calls plus the data end,
``space_timesteps(T, n + 1)`` with the trailing index 0 read as the data (the DPM-Solver grid,
``zero_is_data``), does for every power of two ``n``: the positions ``k (T - 1) / n`` are exact
binary fractions and round alike (4 calls: 999, 749, 500, 250, then data; 8 calls: 999, 874, 749,
...). ``sampling_grid`` therefore always returns that grid, so ``ddim`` at ``N`` steps through the
normal pipeline walks exactly the jumps the student was trained on (its last call is at index
``round((T - 1) / N)``, then the step to data).

The parameterisation. ``x^`` comes from the student's output read as ``objective.prediction``. The
paper shows that eps-prediction cannot be distilled to few steps: at the first call (index 999)
the cosine schedule has ``abar = 2.4e-9``, so ``x0 = (z - sigma eps) / alpha`` multiplies any error of
eps by 20,000 and the first step of a 4-step sampler is noise. ``ditkit distill`` therefore trains
``v``-prediction students (``v = alpha eps - sigma x0``, Sec. 4) by default, initialised from the
teacher's weights whatever it predicts (only the output's meaning changes; round 1 relearns it).

Guidance: the round-1 teacher is the guided model ``uncond + w (cond - uncond)`` at
``teacher_cfg_scale`` (guidance on the raw output, as ``samplers/guidance.py``); the student is a
plain conditional model that reproduces it in one pass and is sampled at ``cfg_scale`` 1 (the
"fixed guidance" variant; Meng et al. 2023 condition the student on ``w`` instead). A teacher that is
itself distilled already carries the guidance and is called unguided.

The teacher is loaded on the first ``loss`` call through ``load_teacher(path) -> (net, objective,
config)``, which ``ditkit.builders.build_objective`` passes in (this room does not read checkpoints).
Building the objective to sample a student therefore never opens the teacher.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ditkit.diffusion.gaussian import GaussianDiffusion, _at, _mean_flat
from ditkit.diffusion.schedules import (
    PREDICTIONS,
    GaussianSchedule,
    make_schedule,
    sample_noise,
    sample_noise_rows,
    snr_from_alphas_cumprod,
    space_timesteps,
    x0_eps_from_prediction,
)
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES

__all__ = ["ProgressiveDistillation", "distillation_grid", "ddim_step", "distillation_target"]

# (net(x, t_float, y) -> raw output, the teacher's objective, the teacher's config)
TeacherLoader = Callable[[str], tuple[Callable[..., Tensor], Any, Any]]


def distillation_grid(num_timesteps: int, num_steps: int) -> list[int]:
    """The ``num_steps + 1`` decreasing indices of an ``num_steps``-call DDIM grid whose last entry
    0 stands for the data (``abar = 1``): ``space_timesteps(T, num_steps + 1)``. The grid of ``n``
    steps is every other point of the grid of ``2n`` for ``n`` a power of two."""
    return space_timesteps(num_timesteps, num_steps + 1, "uniform")


def ddim_step(x0: Tensor, eps: Tensor, abar_next: Tensor) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0) to the level ``abar_next``
    (broadcastable, 1 for the data): ``sqrt(abar_next) x0 + sqrt(1 - abar_next) eps``."""
    return abar_next.sqrt() * x0 + (1 - abar_next).clamp(min=0).sqrt() * eps


def distillation_target(z_t: Tensor, z_next: Tensor, abar_t: Tensor, abar_next: Tensor) -> Tensor:
    """The ``x0`` whose single DDIM step from ``z_t`` (level ``abar_t``) lands on ``z_next`` (level
    ``abar_next``, 1 for the data): Salimans & Ho 2022, Alg. 2,
    ``(z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha)``. Shapes broadcast like ``z_t``."""
    ratio = (1 - abar_next).clamp(min=0).sqrt() / (1 - abar_t).sqrt()  # sigma'' / sigma, 0 at the data
    return (z_next - ratio * z_t) / (abar_next.sqrt() - ratio * abar_t.sqrt())


@OBJECTIVES.register("distill", modality="image", family="gaussian", teacher=True,
                     summary="progressive distillation of a gaussian teacher (Salimans & Ho 2022)")
class ProgressiveDistillation(GaussianDiffusion):
    """A gaussian objective whose loss matches two DDIM steps of a frozen teacher in one step.

    Sampling (``denoiser``, ``sample``) is the gaussian objective's, on the nested grid
    (``distillation_grid``) of the requested step count.

    Args:
        schedule: the teacher's schedule (the student shares it).
        prediction: what the student's output means (``"v"`` recommended, see the module docstring).
        teacher: run directory or checkpoint of this round's teacher.
        teacher_steps: DDIM steps of the teacher; the student learns ``teacher_steps // 2``.
        teacher_cfg_scale: guidance scale of the original teacher, applied to an undistilled teacher.
        load_teacher: ``path -> (net(x, t, y), teacher objective, teacher config)``; None: the
            objective samples but cannot train (``loss`` raises ``ConfigError``).
        clip_x0: the sampling clamp of the student's denoiser (as ``GaussianDiffusion``).
    """

    family = "gaussian"
    default_sampler = "ddim"
    timestep_spacings = ("uniform",)  # the nested grid of the module docstring

    def __init__(
        self,
        schedule: GaussianSchedule,
        prediction: str = "v",
        *,
        teacher: str,
        teacher_steps: int,
        teacher_cfg_scale: float = 1.0,
        load_teacher: Optional[TeacherLoader] = None,
        clip_x0: float | None = None,
    ) -> None:
        super().__init__(schedule, prediction=prediction, learn_sigma=False, clip_x0=clip_x0)
        if teacher_steps < 2 or teacher_steps % 2 or teacher_steps > schedule.num_timesteps - 1:
            raise ValueError(f"teacher_steps={teacher_steps}: use an even count in [2, {schedule.num_timesteps - 1}]")
        self.teacher_path = teacher
        self.teacher_steps = teacher_steps
        self.student_steps = teacher_steps // 2
        self.teacher_cfg_scale = teacher_cfg_scale
        self.load_teacher = load_teacher
        grid = distillation_grid(schedule.num_timesteps, teacher_steps)
        self.teacher_grid = torch.tensor(grid, dtype=torch.long)  # (2N + 1,), last 0 = data
        self.student_model: Optional[str] = None
        self._teacher: Optional[tuple[Callable[..., Tensor], Any, float, Optional[int], Optional[int]]] = None

    @classmethod
    def from_config(
        cls, cfg: Any, clip_x0: Optional[float] = None, load_teacher: Optional[TeacherLoader] = None
    ) -> ProgressiveDistillation:
        """Build from a full ``Config``: ``objective.teacher``, ``teacher_steps``,
        ``teacher_cfg_scale``, ``schedule``, ``num_timesteps``, ``prediction``. Raises a one-line
        ``ConfigError`` naming the field to fix."""
        o = cfg.objective
        if not o.teacher:
            raise ConfigError("objective.kind=distill needs a teacher: set objective.teacher=RUN (or use ditkit distill --teacher RUN)")
        steps = o.teacher_steps
        if steps is None or steps < 2 or steps & (steps - 1):
            raise ConfigError(f"objective.teacher_steps={steps}: use a power of two >= 2 (the student takes half as many)")
        if steps >= o.num_timesteps:
            raise ConfigError(f"objective.teacher_steps={steps} must be below objective.num_timesteps={o.num_timesteps}")
        if o.learn_sigma:
            raise ConfigError("objective.learn_sigma=true: a distilled student samples with DDIM and has no variance; set it to false")
        if o.prediction not in PREDICTIONS:
            raise ConfigError(f"objective.prediction={o.prediction!r}: use one of {', '.join(PREDICTIONS)}")
        if o.teacher_cfg_scale < 0:
            raise ConfigError(f"objective.teacher_cfg_scale={o.teacher_cfg_scale}: use a value >= 0 (1 = no guidance)")
        spacing = getattr(cfg.sample, "timestep_spacing", "uniform")
        if spacing != "uniform":
            raise ConfigError(f"sample.timestep_spacing={spacing}: a distilled student samples on the uniform grid it learned")
        try:
            schedule = make_schedule(o.schedule, o.num_timesteps)
        except ValueError as err:
            raise ConfigError(f"objective.schedule={o.schedule!r}, num_timesteps={o.num_timesteps}: {err}") from None
        objective = cls(schedule, o.prediction, teacher=str(o.teacher), teacher_steps=steps,
                        teacher_cfg_scale=o.teacher_cfg_scale, load_teacher=load_teacher, clip_x0=clip_x0)
        objective.student_model = getattr(cfg.model, "name", None)  # checked against the teacher's on loading
        return objective

    # ---- sampling: the gaussian objective's, on the nested grid -------------------------------
    def sampling_grid(
        self, num_steps: int, *, timestep_spacing: str = "uniform", zero_is_data: bool = False
    ) -> tuple[Tensor, list[int]]:
        """``(alphas_cumprod, timesteps)`` of ``num_steps`` network calls on ``distillation_grid``;
        the trailing 0 (the data) is kept for ``zero_is_data`` solvers and dropped for DDIM/DDPM,
        which step from their last index to the data."""
        if timestep_spacing != "uniform":
            raise ConfigError(f"--timestep-spacing {timestep_spacing}: a distilled student samples on the uniform grid it learned")
        grid = distillation_grid(self.num_timesteps, num_steps)
        return self.alphas_cumprod, grid if zero_is_data else grid[:-1]

    # ---- the teacher --------------------------------------------------------------------------
    def teacher(self, device: torch.device) -> tuple[Callable[..., Tensor], Any, float, Optional[int], Optional[int]]:
        """``(net, objective, guidance scale, guide_channels, null class)`` of the frozen teacher on
        ``device``, loaded once through ``load_teacher``."""
        if self._teacher is None:
            if self.load_teacher is None:
                raise ConfigError("this distillation objective was built without a teacher loader: "
                                  "build it with ditkit.builders.build_objective")
            net, objective, tcfg = self.load_teacher(self.teacher_path)
            if self.student_model is not None and tcfg.model.name != self.student_model:
                raise ConfigError(f"objective.teacher={self.teacher_path} is a {tcfg.model.name} but the student is a "
                                  f"{self.student_model}: distil into the teacher's model (--model {tcfg.model.name})")
            if getattr(objective, "family", None) != "gaussian":
                raise ConfigError(f"objective.teacher={self.teacher_path} is a {tcfg.objective.kind} model: "
                                  "distillation needs a gaussian teacher")
            if not torch.equal(objective.alphas_cumprod, self.alphas_cumprod):
                raise ConfigError(f"objective.teacher={self.teacher_path} uses schedule {tcfg.objective.schedule}/"
                                  f"{tcfg.objective.num_timesteps}: set objective.schedule and num_timesteps to the teacher's")
            # a distilled teacher already carries the guidance of its own teacher
            scale = 1.0 if tcfg.objective.kind == "distill" else self.teacher_cfg_scale
            self._teacher = (net, objective, scale, tcfg.sample.guide_channels, tcfg.data.num_classes)
        net, objective, scale, guide_channels, num_classes = self._teacher
        if isinstance(net, torch.nn.Module):
            net.to(device)
        return net, objective, scale, guide_channels, num_classes

    def teacher_denoiser(self, y: Tensor | None, device: torch.device) -> Callable[[Tensor, Tensor], Any]:
        """``fn(x_t, t_index (B,) int64) -> GaussianPrediction`` of the (guided) teacher for labels
        ``y``, as its own sampling would call it (its x0 clamp included)."""
        net, objective, scale, guide_channels, null_class = self.teacher(device)
        if y is None or scale == 1.0:
            return objective.denoiser(lambda x, t: net(x, t, y))

        def guided(x: Tensor, t: Tensor) -> Tensor:  # one batch of 2B: cond then uncond (samplers/guidance.py)
            out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, int(null_class))]))
            cond, uncond = out.float().chunk(2)
            k = cond.shape[1] if guide_channels is None else guide_channels
            return torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)

        return objective.denoiser(guided)

    @torch.no_grad()
    def teacher_target(self, x0: Tensor, y: Tensor | None, step: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(z_t, t, x~)`` for student steps ``step`` ``(B,)`` int64 in ``[0, N)``: the noisy input
        ``(B, ...)`` at the student's index ``t`` ``(B,)`` and the target of Alg. 2 ``(B, ...)``."""
        grid = self.teacher_grid.to(x0.device)
        t, t_mid, t_next = grid[2 * step], grid[2 * step + 1], grid[2 * step + 2]
        last = 2 * step + 2 == len(grid) - 1  # (B,) bool: t'' is the data
        abar = self.alphas_cumprod
        abar_t, abar_mid = _at(abar, t, x0), _at(abar, t_mid, x0)
        abar_next = torch.where(last.reshape(-1, *([1] * (x0.ndim - 1))), torch.ones_like(abar_t), _at(abar, t_next, x0))
        z_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise
        denoise = self.teacher_denoiser(y, x0.device)
        first = denoise(z_t, t)
        z_mid = ddim_step(first.x0.float(), first.eps.float(), abar_mid)
        second = denoise(z_mid, t_mid)
        z_next = ddim_step(second.x0.float(), second.eps.float(), abar_next)
        return z_t, t, distillation_target(z_t, z_next, abar_t, abar_next)

    # ---- training -----------------------------------------------------------------------------
    def loss_terms(
        self,
        model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample terms ``{"mse", "weight", "loss"}``, each ``(B,)``: ``mse`` the x0 error of the
        student against the two-step teacher target, ``loss = weight * mse`` (``loss_weight``).

        ``t`` here is the student's step number ``(B,)`` int64 in ``[0, N)`` (its grid index, not a
        DDPM index; default uniform) and ``noise`` the ``eps`` of ``z_t``; both are drawn from
        ``generator`` unless given (the same two draws, in the same order, as ``global_draws``)."""
        if t is None:
            t = torch.randint(0, self.student_steps, (x0.shape[0],), generator=generator,
                              device=generator.device if generator is not None else x0.device).to(x0.device)
        if noise is None:
            noise = sample_noise(x0, generator=generator)
        z_t, t_index, target = self.teacher_target(x0.float(), y, t, noise.float())
        out = model(z_t, t_index.float(), y).float()
        mean_out, _ = self._split(out, x0.shape[1])
        x0_pred, _ = x0_eps_from_prediction(mean_out, z_t, _at(self.alphas_cumprod, t_index, z_t), self.prediction)
        mse = _mean_flat((target - x0_pred) ** 2)
        weight = self.loss_weight(t_index).to(mse)
        return {"mse": mse, "weight": weight, "loss": weight * mse}

    def loss_weight(self, t_index: Tensor) -> Tensor:
        """Weight ``(B,)`` float64 of the x0 error at DDPM indices ``t_index``: the "truncated SNR"
        ``max(SNR_t, 1)`` of Salimans & Ho 2022 (Sec. 5: x0 error at high noise, eps error at low
        noise) for v and x0 students; ``SNR_t`` (the plain eps error) for eps students, whose x0 at
        the noisiest index is ``(z - sigma eps) / alpha`` with ``alpha = 5e-5`` (cosine): weighted by
        ``max(SNR, 1)``, that step's error (thousands) swamped every other step and the student got
        worse than its initialisation (measured on the tiny test model)."""
        snr = snr_from_alphas_cumprod(self.alphas_cumprod).to(t_index.device)[t_index]
        return snr if self.prediction == "eps" else snr.clamp(min=1.0)

    def global_draws(self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator) -> dict[str, Tensor]:
        """The student steps ``t`` ``(b,)`` and ``noise`` ``(b, ...)`` that ``loss`` would draw for a
        global batch of ``global_batch``, cut to this rank's ``rows`` (same numbers, same order)."""
        t = torch.randint(0, self.student_steps, (global_batch,), generator=generator, device=generator.device)
        return {"t": t[rows].to(x.device), "noise": sample_noise_rows(x, global_batch, rows, generator)}

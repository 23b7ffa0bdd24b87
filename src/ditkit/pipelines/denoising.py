"""The pipelines of the continuous objectives (gaussian, flow, EDM): images, prompts, video and
audio share one sampler check, one sampler-option and grid rule, one guided batch loop and one
sampling record. Each modality adds its shapes, outputs and files (``image.py``, ``video.py``,
``audio.py``); text (``text.py``) has discrete samplers of its own and does not use this class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from ditkit.builders import build_objective, default_sampler
from ditkit.config import Config, ConfigError
from ditkit.pipelines.base import GeneratorArg, Pipeline, generator_slice, resolve_generators, trajectory_indices
from ditkit.registry import SAMPLERS
from ditkit.samplers.guidance import classifier_free_guidance

__all__ = ["DenoisingPipeline", "BatchHook", "SamplingPlan", "TrajectoryRecorder", "LatentDecoding", "load_decoder", "sampling_clip_x0",
           "condition_rows"]


def sampling_clip_x0(cfg: Config) -> Optional[float]:
    """The x0 clamp of gaussian sampling: ``objective.clip_x0``, auto (None) = 1 for pixel data in
    [-1, 1] (ADM's clip_denoised), no clipping for latents (official DiT); 0 = no clipping."""
    clip = cfg.objective.clip_x0
    if clip is None:
        return None if cfg.data.latent_channels else 1.0
    return clip or None


def load_decoder(cfg: Config, vae: Optional[str | Path] = None, device: torch.device | str = "cpu") -> Optional[Any]:
    """The ``LatentVAE`` that decodes a latent model's samples: ``vae`` if given, else the folder
    ``data.vae`` records; None for pixel models and for latent models without a VAE."""
    if not cfg.data.latent_channels:
        if vae is not None:
            raise ConfigError(f"--vae {vae}: this checkpoint is a pixel-space model; drop --vae")
        return None
    path = vae if vae is not None else cfg.data.vae
    if path is None:
        return None
    if not Path(path).is_dir():
        raise ConfigError(
            f"VAE folder {path} ({'--vae' if vae is not None else 'recorded in the checkpoint config'}) does not exist: "
            "pass --vae PATH to a local diffusers AutoencoderKL folder"
        )
    from ditkit.interop.vae import load_vae

    decoder = load_vae(path, device=device)
    if decoder.latent_channels != cfg.data.latent_channels or decoder.downsample != (cfg.data.vae_downsample or decoder.downsample):
        raise ConfigError(
            f"--vae {path} has {decoder.latent_channels} latent channels and downsamples {decoder.downsample}x; the "
            f"model works on {cfg.data.latent_channels} channels at {cfg.data.vae_downsample}x: pass the VAE it was trained with"
        )
    return decoder


class LatentDecoding:
    """Mixed in before ``DenoisingPipeline`` by the pipelines whose models may work on VAE latents
    (images, video): ``vae`` (a path, a loaded ``LatentVAE``, or None: the folder the checkpoint
    records) becomes ``self.vae``, and ``--vae`` is refused for pixel-space checkpoints."""

    def __init__(self, model: torch.nn.Module, cfg: Config, *, vae: Optional[Any] = None, **kwargs: Any) -> None:
        super().__init__(model, cfg, **kwargs)  # type: ignore[call-arg]
        if isinstance(vae, (str, Path)) or (vae is None and cfg.data.latent_channels and cfg.data.vae):
            vae = load_decoder(cfg, vae, self.device)  # type: ignore[attr-defined]
        self.vae = vae  # a LatentVAE that decodes a latent model's samples, or None

    @classmethod
    def check_extras(cls, cfg: Config, vae: Optional[str | Path] = None, **extras: Any) -> None:
        super().check_extras(cfg, **extras)  # type: ignore[misc]
        if vae is not None and not cfg.data.latent_channels:
            raise ConfigError(f"--vae {vae}: this checkpoint is a pixel-space model; drop --vae")

    def finish_images(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """``sample_batches``' ``finish`` for images: a latent model's latents (N, c, h, w) decoded
        by the VAE to pixels in [-1, 1], or kept as they are (unclamped) without one; None for a
        pixel model (its samples are clamped to [-1, 1])."""
        cfg = self.cfg  # type: ignore[attr-defined]
        if not cfg.data.latent_channels:
            return None
        if self.vae is None:
            return lambda z: z
        return lambda z: self.vae.decode_to(z, cfg.data.channels)


@dataclass
class SamplingPlan:
    """One pipeline call's checked settings (``DenoisingPipeline.plan``): ``labels`` (one per
    sample, or None), ``n`` samples, the sampler and its ``steps`` / guidance ``scale`` /
    timestep ``spacing`` / ``options``, ``seed`` with the per-sample ``seeds`` (None when the
    caller gave generators) and ``generators``, and the sampler steps to record
    (``trajectory_steps``, empty for none)."""

    labels: Optional[list[int]]
    n: int
    sampler: str
    steps: int
    scale: float
    spacing: Optional[str]
    options: dict[str, Any]
    seed: int
    seeds: Optional[list[int]]
    generators: Any
    trajectory_steps: list[int]

    @property
    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of ``DenoisingPipeline.sample_batches`` the plan fixes."""
        return {"sampler": self.sampler, "steps": self.steps, "scale": self.scale, "spacing": self.spacing,
                "options": self.options}


class TrajectoryRecorder:
    """A sampler callback's recording half: at each of ``steps`` (sampler step indices) it keeps
    ``(x0_pred, x_t)`` as float32 CPU tensors, ``x0_pred`` clamped to [-1, 1] unless ``clamp_x0`` is
    off (latents), ``x_t`` with ``clamp_xt``, one row per batch (a batch's first recorded step opens it). ``stack()`` gives ``(trajectory, trajectory_xt)``, each
    ``(N, K, *sample shape)``, or ``(None, None)``."""

    def __init__(self, steps: Sequence[int], clamp_xt: bool = False, clamp_x0: bool = True) -> None:
        self.steps, self.clamp_xt, self.clamp_x0 = list(steps), clamp_xt, clamp_x0
        self.batches: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __call__(self, i: int, x: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if i not in self.steps:
            return
        if i == self.steps[0]:
            self.batches.append([])
        x_t = x.float().clamp(-1, 1) if self.clamp_xt else x.float()
        x0 = x0_pred.float().clamp(-1, 1) if self.clamp_x0 else x0_pred.float()
        self.batches[-1].append((x0.cpu(), x_t.cpu()))

    def callback(self, progress: Optional[Callable[[int], None]], units: int = 1) -> Callable[..., None]:
        """The sampler's per-step ``callback(i, x_t, x0_pred)``: record, then ``progress(units)``."""

        def callback(i: int, x: torch.Tensor, x0_pred: torch.Tensor) -> None:
            self(i, x, x0_pred)
            if progress is not None:
                progress(units)

        return callback

    def stack(self, decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
              ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``decode`` (e.g. a VAE: latents (M, ...) -> pixels (M, ...)) maps every recorded state, as
        the samples were mapped."""
        if not self.batches:
            return None, None
        stacked = (torch.cat([torch.stack([x0 for x0, _ in batch], 1) for batch in self.batches]),
                   torch.cat([torch.stack([xt for _, xt in batch], 1) for batch in self.batches]))
        if decode is None:
            return stacked
        return tuple(decode(z.flatten(0, 1)).cpu().unflatten(0, z.shape[:2]) for z in stacked)  # type: ignore[return-value]


class BatchHook:
    """A feature riding on ``DenoisingPipeline.sample_batches``' loop without a loop of its own
    (attention maps, guidance maps, step caching). Every part is a no-op here: ``wrap(forward)``
    returns the network ``forward(x, t, y)`` to sample with (once per call), ``on_branches(cond,
    uncond)`` (None: not needed) sees both halves of every guided network call, and ``batch(lo,
    hi)`` is a context manager around the sampling of rows ``lo:hi``."""

    on_branches: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None

    def wrap(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return forward

    def batch(self, lo: int, hi: int) -> ContextManager[Any]:
        return contextlib.nullcontext()


class DenoisingPipeline(Pipeline):
    """Base of the pipelines whose objective denoises continuous tensors (see the module docstring)."""

    def plan(
        self,
        class_labels: Optional[Sequence[int | str]] = None,
        num_samples: Optional[int] = None,
        *,
        sampler: Optional[str],
        num_inference_steps: Optional[int],
        guidance_scale: Optional[float],
        timestep_spacing: Optional[str] = None,
        eta: Optional[float] = None,
        seed: Optional[int] = None,
        generator: GeneratorArg = None,
        batch_size: int = 1,
        allow_untrained_uncond: bool = False,
        trajectory_points: int = 0,
        count: Optional[int] = None,
    ) -> SamplingPlan:
        """What every ``__call__`` checks and resolves before drawing, in one place: batch size and
        trajectory count, the labels (``resolve_labels``; or ``count`` samples without labels when
        the caller conditions otherwise, e.g. on prompts), sampler / steps / guidance / spacing
        (``check_options``), the guidance check (``check_plan_guidance``), the seeds and
        generators (``resolve_generators``: sample ``i`` from ``seed + i`` unless ``generator``)
        and the sampler options (``eta``). ``ConfigError`` says what to change."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        if trajectory_points < 0:
            raise ConfigError(f"--trajectory-points {trajectory_points}: use a count >= 1 (0: no trajectory)")
        labels, n = self.resolve_labels(class_labels, num_samples) if count is None else (None, count)
        sampler, steps, scale, spacing = self.check_options(sampler, num_inference_steps, guidance_scale, timestep_spacing)
        self.check_plan_guidance(scale, labels, allow_untrained_uncond)
        seed = self.cfg.sample.seed if seed is None else seed
        seeds, generators = resolve_generators(n, seed, generator)
        return SamplingPlan(labels, n, sampler, steps, scale, spacing, self._sampler_options(sampler, eta), seed, seeds,
                            generators, trajectory_indices(steps, trajectory_points) if trajectory_points else [])

    def check_plan_guidance(self, scale: float, labels: Optional[list[int]], allow_untrained_uncond: bool) -> None:
        """The guidance check of ``plan``: against the null class when sampling with labels."""
        self.check_guidance(scale if labels is not None else 1.0, allow_untrained_uncond)

    def build_objective(self) -> Any:
        return build_objective(self.cfg, clip_x0=sampling_clip_x0(self.cfg))

    @property
    def sampler_names(self) -> list[str]:
        """The samplers that fit this model's objective."""
        return SAMPLERS.names(family=self.objective.family)

    def check_options(
        self, sampler: Optional[str], num_inference_steps: Optional[int], guidance_scale: Optional[float],
        timestep_spacing: Optional[str] = None,
    ) -> tuple[str, int, float, Optional[str]]:
        """``(sampler, steps, guidance scale, timestep spacing)`` with None taken from the
        checkpoint's ``sample`` section, checked against the objective; ``ConfigError`` says what
        to change."""
        cfg = self.cfg
        sampler = default_sampler(cfg) if sampler in (None, "auto") else sampler
        SAMPLERS.get(sampler)  # unknown names: the registry lists them all
        if sampler not in self.sampler_names:
            raise ConfigError(
                f"--sampler {sampler} does not fit a {cfg.objective.kind} model: use one of {', '.join(self.sampler_names)}"
            )
        steps = cfg.sample.num_sampling_steps if num_inference_steps is None else num_inference_steps
        scale = cfg.sample.cfg_scale if guidance_scale is None else guidance_scale
        if steps < 1:
            raise ConfigError(f"--num-sampling-steps {steps}: must be at least 1")
        max_steps = getattr(self.objective, "num_timesteps", None)
        if max_steps is not None and SAMPLERS.get(sampler).meta.get("zero_is_data"):
            max_steps -= 1  # the grid also holds the data end
        if max_steps is not None and steps > max_steps:
            raise ConfigError(f"--num-sampling-steps {steps} exceeds the {max_steps} training steps")
        if scale < 0:
            raise ConfigError(f"--cfg-scale {scale}: use a value >= 0 (1 = no guidance)")
        spacings = self.objective.timestep_spacings
        if spacings:
            timestep_spacing = timestep_spacing or cfg.sample.timestep_spacing
            if timestep_spacing not in spacings:
                raise ConfigError(f"--timestep-spacing {timestep_spacing}: use {' or '.join(spacings)}")
        elif timestep_spacing is not None:
            raise ConfigError(f"--timestep-spacing applies to gaussian samplers; drop it for a {cfg.objective.kind} model")
        return sampler, steps, float(scale), timestep_spacing

    def _sampler_options(self, sampler: str, eta: Optional[float]) -> dict[str, Any]:
        accepted = SAMPLERS.get(sampler).meta.get("options", ())
        options: dict[str, Any] = {}
        if "eta" in accepted:
            options["eta"] = self.cfg.sample.ddim_eta if eta is None else eta
        elif eta is not None:
            raise ConfigError(f"--ddim-eta applies to samplers that take eta; {sampler} does not")
        return options

    def grid_options(self, sampler: str, spacing: Optional[str]) -> dict[str, Any]:
        """What ``objective.sample`` / ``objective.sampling_grid`` take besides the step count: the
        timestep spacing (gaussian), and the data end of the grid for ``zero_is_data`` solvers."""
        grid: dict[str, Any] = {"timestep_spacing": spacing} if spacing is not None else {}
        if SAMPLERS.get(sampler).meta.get("zero_is_data"):  # the solver's grid ends at the data: one more point
            grid["zero_is_data"] = True
        return grid

    def sample_batches(
        self, labels: Optional[list[int]], generators: Any, n: int, shape: Sequence[int], *, sampler: str, steps: int,
        scale: float, spacing: Optional[str], options: dict[str, Any], batch_size: int, guide_channels: int,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
        conditions: Optional[tuple[Any, Any]] = None,
        finish: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        hooks: Sequence["BatchHook"] = (),
        draw: Optional[Callable[..., torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The one guided batch loop of every continuous pipeline: ``n`` samples of ``shape`` (one
        sample, e.g. ``(C, F, H, W)``) drawn ``batch_size`` at a time from the objective's prior with
        ``sampler``, guided on the first ``guide_channels`` output channels when ``scale != 1``:
        ``(n, *shape)`` float32 clamped to [-1, 1] on the CPU.

        ``conditions = (cond, null)`` replaces the labels for prompt models: ``n`` rows each (caption
        ids (n, L) or ``PromptCondition``), guided against ``null`` (the empty or negative prompt).
        ``finish(x0)`` replaces the clamp, e.g. decoding latents through a VAE. ``hooks``
        (``BatchHook``) ride on the loop: they wrap the network, see guidance's two branches and
        enclose each batch (attention and guidance maps, step caching). ``draw(lo, hi, net, x_T,
        generators, callback)`` replaces the objective's plain sampling of rows ``lo:hi`` (image
        control: SDEdit, inpainting)."""
        objective, device = self.objective, self.device
        sampler_fn, grid, forward = SAMPLERS.get(sampler).obj, self.grid_options(sampler, spacing), self.forward_fn()
        for hook in hooks:
            forward = hook.wrap(forward)
        readers = [hook.on_branches for hook in hooks if hook.on_branches is not None]
        on_branches = (lambda cond, uncond: [read(cond, uncond) for read in readers]) if readers else None
        out = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            gens = generator_slice(generators, lo, hi)
            x_T = objective.prior((hi - lo, *shape), gens, device)
            y = torch.tensor(labels[lo:hi], dtype=torch.long, device=device) if labels is not None else None
            if conditions is not None:
                y, y_null = (condition_rows(c, lo, hi) for c in conditions)
                net = (classifier_free_guidance(forward, y, scale, guide_channels=guide_channels, y_null=y_null,
                                                on_branches=on_branches)
                       if scale != 1.0 else lambda x, t, y=y: forward(x, t, y))
            elif y is not None and scale != 1.0:  # guide the mean channels only (a learned variance rides along)
                net = classifier_free_guidance(forward, y, scale, null_class=self.num_classes, guide_channels=guide_channels,
                                               on_branches=on_branches)
            else:
                net = lambda x, t, y=y: forward(x, t, y)  # noqa: E731
            with contextlib.ExitStack() as stack:
                for hook in hooks:
                    stack.enter_context(hook.batch(lo, hi))
                if draw is not None:
                    x0 = draw(lo, hi, net, x_T, gens, callback)
                else:
                    x0 = objective.sample(sampler_fn, net, x_T, steps, generator=gens, callback=callback, **grid, **options)
            out.append(finish(x0.float()).cpu() if finish is not None else x0.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def sampling_metadata(self, plan: SamplingPlan, *, labels: bool = True) -> dict[str, str]:
        """The provenance entries plus the sampling record every output carries (the plan's
        labels too, unless ``labels=False``)."""
        metadata = self.provenance()
        metadata.update({"sampler": plan.sampler, "num_sampling_steps": str(plan.steps), "cfg_scale": str(plan.scale)})
        metadata["seed"] = str(plan.seed) if plan.seeds is not None else "caller's generator"
        for key, value in plan.options.items():
            metadata[key] = str(value)
        if plan.spacing is not None:
            metadata["timestep_spacing"] = plan.spacing
        if labels and plan.labels is not None:
            metadata["labels"] = " ".join(map(str, plan.labels))
        return metadata


def condition_rows(cond: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a batch of conditions: a tensor, or a ``PromptCondition`` (states, mask, pooled)."""
    if isinstance(cond, torch.Tensor):
        return cond[lo:hi]
    return type(cond)(cond.encoder_hidden_states[lo:hi], cond.mask()[lo:hi],
                      None if cond.pooled is None else cond.pooled[lo:hi])

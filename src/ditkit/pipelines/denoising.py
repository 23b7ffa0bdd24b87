"""The pipelines of the continuous objectives (gaussian, flow, EDM): images, prompts, video and
audio share one sampler check, one sampler-option and grid rule, one guided batch loop and one
sampling record. Each modality adds its shapes, outputs and files (``image.py``, ``video.py``,
``audio.py``); text (``text.py``) has discrete samplers of its own and does not use this class.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ditkit.builders import build_objective, default_sampler
from ditkit.config import Config, ConfigError
from ditkit.pipelines.base import Pipeline, generator_slice
from ditkit.registry import SAMPLERS
from ditkit.samplers.guidance import classifier_free_guidance

__all__ = ["DenoisingPipeline", "sampling_clip_x0"]


def sampling_clip_x0(cfg: Config) -> Optional[float]:
    """The x0 clamp of gaussian sampling: ``objective.clip_x0``, auto (None) = 1 for pixel data in
    [-1, 1] (ADM's clip_denoised), no clipping for latents (official DiT); 0 = no clipping."""
    clip = cfg.objective.clip_x0
    if clip is None:
        return None if cfg.data.latent_channels else 1.0
    return clip or None


class DenoisingPipeline(Pipeline):
    """Base of the pipelines whose objective denoises continuous tensors (see the module docstring)."""

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
    ) -> torch.Tensor:
        """``n`` samples of ``shape`` (one sample, e.g. ``(C, F, H, W)``) drawn ``batch_size`` at a
        time from the objective's prior with ``sampler``, guided on the first ``guide_channels``
        output channels when ``scale != 1``: ``(n, *shape)`` float32 clamped to [-1, 1] on the CPU."""
        objective, device = self.objective, self.device
        sampler_fn, grid, forward = SAMPLERS.get(sampler).obj, self.grid_options(sampler, spacing), self.forward_fn()
        out = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            gens = generator_slice(generators, lo, hi)
            x_T = objective.prior((hi - lo, *shape), gens, device)
            y = torch.tensor(labels[lo:hi], dtype=torch.long, device=device) if labels is not None else None
            if y is not None and scale != 1.0:  # guide the mean channels only (a learned variance rides along)
                net = classifier_free_guidance(forward, y, scale, null_class=self.num_classes, guide_channels=guide_channels)
            else:
                net = lambda x, t, y=y: forward(x, t, y)  # noqa: E731
            x0 = objective.sample(sampler_fn, net, x_T, steps, generator=gens, callback=callback, **grid, **options)
            out.append(x0.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def sampling_metadata(
        self, *, sampler: str, steps: int, scale: float, seed: int, seeds: Optional[list[int]],
        options: dict[str, Any], spacing: Optional[str], labels: Optional[list[int]],
    ) -> dict[str, str]:
        """The provenance entries plus the sampling record every output carries."""
        metadata = self.provenance()
        metadata.update({"sampler": sampler, "num_sampling_steps": str(steps), "cfg_scale": str(scale)})
        metadata["seed"] = str(seed) if seeds is not None else "caller's generator"
        for key, value in options.items():
            metadata[key] = str(value)
        if spacing is not None:
            metadata["timestep_spacing"] = spacing
        if labels is not None:
            metadata["labels"] = " ".join(map(str, labels))
        return metadata

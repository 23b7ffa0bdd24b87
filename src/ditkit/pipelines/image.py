"""Images from a class-conditional (or unconditional) image DiT, pixel or latent.

    pipe = ditkit.load("results/digits")
    out = pipe(class_labels=[1, 2], num_inference_steps=50, guidance_scale=1.25,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("one.png")           # PIL images; out.tensors: (N, C, H, W) in [-1, 1]

The sampler is any ``SAMPLERS`` entry of the objective's family (``ddpm``, ``ddim``, ``dpm++``, ...
for gaussian objectives; ``euler``, ``heun`` for flow matching); the objective builds its grid and
runs it (``Objective.sample``); classifier-free guidance wraps the network
(``ditkit.samplers.guidance``). Latent models decode through their VAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ditkit.builders.dit import model_input_shape
from ditkit.config import ConfigError
from ditkit.fileio import atomic_path
from ditkit.media import display_scale, make_grid, save_png, to_pil, to_uint8
from ditkit.models.caching import StepCache, attach_step_cache, make_step_cache
from ditkit.pipelines.base import GeneratorArg, trajectory_indices
from ditkit.progress import announce_total, sampling_progress
from ditkit.pipelines.denoising import BatchHook, DenoisingPipeline, LatentDecoding, TrajectoryRecorder, sampling_clip_x0
from ditkit.pipelines.control import ImageLike, load_image, load_mask, outpaint_canvas, parse_extend
from ditkit.registry import PIPELINES, SAMPLERS
from ditkit.samplers.inpaint import adapter_for, check_jumps, inpaint, prepare_mask, resample_num_calls, sdedit_start

__all__ = ["ImagePipeline", "ImagePipelineOutput", "sampling_clip_x0", "trajectory_indices"]  # trajectory_indices: from base


DEFAULT_STRENGTH = 0.8  # image-to-image without a mask, as diffusers' img2img pipelines


def network_calls(steps: int, strength: Optional[float] = None, jump_length: int = 1, jump_n_sample: int = 1) -> int:
    """Network calls of one batch: ``steps``, cut to ``floor(strength * steps)`` by SDEdit
    (``sdedit_start``), times RePaint's resampling (``resample_num_calls``; raises its ``ConfigError``)."""
    cut = strength is not None and 0.0 < strength < 1.0  # a bad strength is refused later, by the call
    levels = int(strength * steps) if cut else steps
    return resample_num_calls(levels, jump_length, jump_n_sample) if levels else 0


@dataclass
class Control:
    """Checked control inputs in the model's space: ``image`` ``(N, c, h, w)`` (pixels in [-1, 1]
    or VAE latents), ``mask`` ``(N, 1, h, w)`` 0/1 (1 = regenerate) or None, SDEdit ``strength``
    or None (full sampling), RePaint's ``jump_length`` / ``jump_n_sample`` (1 / 1: no jumps)."""

    image: torch.Tensor
    mask: Optional[torch.Tensor]
    strength: Optional[float]
    jump_length: int = 1
    jump_n_sample: int = 1

    def describe(self) -> str:
        what = "inpainting" if self.mask is not None else "image-to-image"
        if self.jump_n_sample > 1:
            what += f", resampling jumps {self.jump_length}x{self.jump_n_sample} (ancestral steps on the sampler's grid)"
        return what + (f", strength {self.strength:g}" if self.strength is not None else "")

    def network_calls(self, steps: int) -> int:
        """Network calls per batch with this control (``network_calls``)."""
        return network_calls(steps, self.strength, self.jump_length, self.jump_n_sample)


@dataclass
class ImagePipelineOutput:
    """What an image pipeline returns.

    images: N PIL images (``L`` or ``RGB``; empty for undecoded latents); tensors: ``(N, C, H, W)``
    float32 in [-1, 1] on the CPU (latents unclamped when ``is_latent``); labels / seeds per sample
    (seeds None when the caller passed generators); metadata: entries that identify the run and the
    sampling (also written into every PNG); trajectory: ``(N, K, C, H, W)`` x0 predictions at
    ``trajectory_steps`` or None."""

    images: list[Image.Image]
    tensors: torch.Tensor
    labels: Optional[list[int]]
    seeds: Optional[list[int]]
    metadata: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    trajectory: Optional[torch.Tensor] = None
    trajectory_steps: list[int] = field(default_factory=list)
    is_latent: bool = False
    trajectory_xt: Optional[torch.Tensor] = None  # (N, K, C, H, W) the noisy states at those steps
    guidance_maps: Optional[torch.Tensor] = None  # (N, 1, h, w) in [0, 1]: where guidance changed the output

    def sample_metadata(self, index: int) -> dict[str, str]:
        """Metadata of sample ``index``: the shared entries plus its seed and label."""
        meta = dict(self.metadata)
        if self.seeds is not None:
            meta["seed"] = str(self.seeds[index])
        meta["sample_index"] = str(index)
        if self.labels is not None:
            label = self.labels[index]
            meta["label"] = str(label)
            if label < len(self.class_names):
                meta["class_name"] = self.class_names[label]
        else:
            meta["label"] = "none (unconditional)"
        return meta

    def save(self, out_dir: str | Path, *, nrow: Optional[int] = None, npz: bool = False) -> list[Path]:
        """Write ``grid.png`` and one PNG per sample (metadata in tEXt chunks), optionally
        ``samples.npz`` (ADM layout: arr_0 uint8 NxHxWxC, arr_1 labels) and ``trajectory.png``;
        undecoded latents go to ``latents.npz``. Returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_latent:
            arrays: dict[str, Any] = {"arr_0": self.tensors.numpy()}
            if self.seeds is not None:
                arrays["seeds"] = np.asarray(self.seeds, dtype=np.int64)
            if self.labels is not None:
                arrays["arr_1"] = np.asarray(self.labels, dtype=np.int64)
            with atomic_path(out / "latents.npz") as tmp:
                np.savez(tmp, **arrays)
            return [out / "latents.npz"]
        scale = display_scale(self.tensors.shape[-1])
        pixels = to_uint8(self.tensors)
        for i in range(len(pixels)):
            save_png(pixels[i], out / f"{i:06d}.png", self.sample_metadata(i))
        save_png(make_grid(self.tensors, nrow=nrow, scale=scale), out / "grid.png", self.metadata)
        written = [out / "grid.png"] + [out / f"{i:06d}.png" for i in range(len(pixels))]
        if npz:
            arrays = {"arr_0": pixels}
            if self.labels is not None:
                arrays["arr_1"] = np.asarray(self.labels, dtype=np.int64)
            with atomic_path(out / "samples.npz") as tmp:
                np.savez(tmp, **arrays)
            written.append(out / "samples.npz")
        if self.trajectory is not None:
            traj = self.trajectory[: min(8, len(self.trajectory))]  # (n, K, C, H, W): rows = samples
            n, k = traj.shape[:2]
            layout = "rows: samples, columns: steps (predicted x0)"
            if self.trajectory_xt is not None:  # each sample: a row of x0 predictions, then the noisy states
                traj = torch.stack([traj, self.trajectory_xt[:n]], dim=1).reshape(2 * n, k, *traj.shape[2:])
                layout = "per sample two rows: predicted x0, then the noisy x_t; columns: steps"
            strip = make_grid(traj.reshape(-1, *traj.shape[2:]), nrow=k, scale=scale)
            steps = " ".join(map(str, self.trajectory_steps))
            save_png(strip, out / "trajectory.png", {**self.metadata, "trajectory_steps": steps, "layout": layout})
            written.append(out / "trajectory.png")
        if self.guidance_maps is not None:
            maps = torch.nn.functional.interpolate(self.guidance_maps, size=self.tensors.shape[-2:], mode="nearest")
            pairs = torch.stack([self.tensors[:, :3].mean(1, keepdim=True) if self.tensors.shape[1] == 3 else self.tensors,
                                 maps * 2 - 1], dim=1).reshape(-1, 1, *self.tensors.shape[-2:])
            save_png(make_grid(pairs, nrow=2 * min(8, len(maps)) if len(maps) > 1 else 2, scale=scale),
                     out / "guidance_map.png",
                     {**self.metadata, "layout": "pairs: sample (gray), |cond - uncond| summed over steps (white = most)"})
            written.append(out / "guidance_map.png")
        return written


class StepCaching(BatchHook):
    """Step caching (``ditkit.models.caching``) around each batch: the cache starts every sampling
    trajectory empty."""

    def __init__(self, model: torch.nn.Module, cache: Optional[StepCache]) -> None:
        self.model, self.cache = model, cache

    def batch(self, lo: int, hi: int) -> attach_step_cache:
        return attach_step_cache(self.model, self.cache)


class GuidanceMaps(BatchHook):
    """Where guidance acted: ``|cond - uncond|`` of the first ``channels`` output channels, averaged
    over them and summed over the network calls, one ``(B, 1, H, W)`` map per batch in ``maps``,
    scaled to a maximum of 1 per sample."""

    def __init__(self, channels: int) -> None:
        self.channels, self.maps, self._sum = channels, [], None  # type: ignore[var-annotated]

    def on_branches(self, cond: torch.Tensor, uncond: torch.Tensor) -> None:  # type: ignore[override]
        diff = (cond[:, : self.channels] - uncond[:, : self.channels]).abs().mean(1, keepdim=True).float().cpu()
        self._sum = diff if self._sum is None else self._sum + diff

    @contextlib.contextmanager
    def batch(self, lo: int, hi: int) -> Iterator[None]:
        self._sum = None
        yield
        if self._sum is not None:
            m = self._sum
            self.maps.append(m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1))


@PIPELINES.register("image")
class ImagePipeline(LatentDecoding, DenoisingPipeline):
    """Class-conditional / unconditional image DiT, pixel or latent (see the module docstring)."""

    modality = "image"
    supports_distributed = True

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Sequence[int | str]] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: GeneratorArg = None,
        *,
        num_samples: Optional[int] = None,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        guide_channels: Optional[int] = None,
        timestep_spacing: Optional[str] = None,
        batch_size: int = 64,
        trajectory_points: int = 0,
        progress: Optional[Callable[[int], None]] = None,
        allow_untrained_uncond: bool = False,
        distributed: bool = False,
        cache: Optional[str] = None,
        image: Optional[ImageLike] = None,
        mask_image: Optional[ImageLike] = None,
        strength: Optional[float] = None,
        extend: Optional[str | dict[str, int]] = None,
        guidance_map: bool = False,
        strict: bool = False,
        jump_length: int = 1,
        jump_n_sample: int = 1,
    ) -> ImagePipelineOutput:
        """Draw images.

        ``class_labels``: ints or class names, repeated to ``num_samples`` (default: one image per
        label; the classes in turn, 16 images, when none are given). ``num_inference_steps``,
        ``guidance_scale`` (classifier-free guidance, 1 = none; the official DiT's ``cfg_scale``),
        ``sampler`` (a ``SAMPLERS`` name fitting the objective), ``eta`` (DDIM), ``guide_channels``
        (guide only the first N output channels; default the mean-prediction channels) and
        ``timestep_spacing`` default to the checkpoint's ``sample`` section. ``generator``: one
        ``torch.Generator`` or one per sample; without it sample ``i`` uses seed ``seed + i``.
        ``progress(1)`` is called once per network step and batch; an exception raised there
        aborts the call. ``distributed``: every rank of the default process group calls this with
        the same arguments and draws a share of the samples; rank 0's output holds them all.
        ``cache``: step caching between network calls (``ditkit.models.caching``): ``"fora:N"``
        (recompute every N calls), ``"teacache:T"`` (reuse while the accumulated relative change
        stays below T), None / ``"none"`` (off, the default); recorded in the metadata.

        Control (diffusers' argument names; ``ditkit.samplers.inpaint``): ``image`` (a path, PIL
        image, list, or ``(N, C, H, W)`` tensor in [-1, 1]; one image serves every sample) with
        ``mask_image`` (white = regenerate) inpaints RePaint-style; ``extend`` (``"left=16,top=8"``)
        outpaints: the image is shrunk into the canvas and the border generated; ``image`` with
        ``strength`` in (0, 1] (default 0.8 without a mask) is image-to-image (SDEdit): strength 1
        is plain sampling from the same noise, small strengths keep the layout. A latent model
        encodes the image with its VAE. ``strict``: refuse an image or mask of another size instead
        of resizing. ``guidance_map``: also return ``|cond - uncond|`` of the network output summed
        over the steps, ``(N, 1, H, W)`` scaled to [0, 1] per sample (where guidance acted).
        ``jump_length`` / ``jump_n_sample`` (inpainting only; RePaint's ``j`` and ``r``, 1 / 1 = off):
        resampling jumps; the sampler then only sets the grid of levels, every descent is an
        ancestral step, and the network calls (``progress`` calls, trajectory steps) grow to
        ``network_calls(steps, strength, j, r)``.

        Raises ``ConfigError`` for labels outside the classes, a sampler that does not fit the
        objective, guidance on a model whose unconditional branch was never trained (unless
        ``allow_untrained_uncond``: a warning), and bad steps / scales / batch sizes.
        """
        cfg = self.cfg
        # the trajectory is over network calls, which control changes: _draw picks its steps
        plan = self.plan(class_labels, num_samples, sampler=sampler, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, timestep_spacing=timestep_spacing, eta=eta, seed=seed,
                         generator=generator, batch_size=batch_size, allow_untrained_uncond=allow_untrained_uncond)
        labels = plan.labels
        step_cache = make_step_cache(cache)
        attach_step_cache(self.model, step_cache)  # refuses a model without the hook before any work
        control = self._control(plan.n, image, mask_image, strength, extend, strict, jump_length, jump_n_sample)
        draw = self._draw_distributed if distributed else self._draw
        tensors, trajectory, traj_idx, extras = draw(
            labels, plan.generators, guide_channels=guide_channels, batch_size=batch_size,
            trajectory_points=trajectory_points, progress=progress, step_cache=step_cache, control=control,
            guidance_map=guidance_map, **plan.sampling,
        )
        is_latent = bool(cfg.data.latent_channels) and self.vae is None
        metadata = self.sampling_metadata(plan, labels=False)
        if step_cache is not None:
            metadata["cache"] = step_cache.spec
            metadata["cache_reuse"] = step_cache.summary()
        if cfg.data.latent_channels:
            metadata["output"] = "latents (no VAE to decode)" if is_latent else "decoded latents"
            if self.vae is not None:
                metadata["vae"] = str(self.vae.path)
        if labels is not None:
            metadata["labels"] = " ".join(map(str, labels))
        if control is not None:
            metadata["control"] = control.describe()
        images = [] if is_latent else to_pil(tensors)
        return ImagePipelineOutput(images, tensors, labels, plan.seeds, metadata, list(self.class_names), trajectory,
                                   traj_idx, is_latent, trajectory_xt=extras.get("xt"),
                                   guidance_maps=extras.get("guidance"))

    def _control(
        self, n: int, image: Optional[ImageLike], mask_image: Optional[ImageLike], strength: Optional[float],
        extend: Optional[str | dict[str, int]], strict: bool, jump_length: int = 1, jump_n_sample: int = 1,
    ) -> Optional[Control]:
        """The checked control inputs in the model's space (latents for latent models), or None."""
        jumps = (jump_length, jump_n_sample) != (1, 1)
        check_jumps(jump_length, jump_n_sample)
        if jumps and (mask_image is None and extend is None):
            raise ConfigError("--jump-length/--jump-n-sample resample inpainting: give --init-image with --mask or --extend")
        if image is None:
            if mask_image is not None or strength is not None or extend is not None:
                raise ConfigError("--mask, --strength and --extend edit an image: give --init-image too")
            return None
        cfg = self.cfg
        if cfg.data.latent_channels and self.vae is None:
            raise ConfigError("this latent model needs its VAE to encode --init-image: pass --vae PATH")
        pixels = load_image(image, cfg.data.image_size, cfg.data.channels or 3, strict=strict)
        mask = None
        if extend is not None:
            if mask_image is not None:
                raise ConfigError("--extend makes its own mask: drop --mask")
            pixels, mask = outpaint_canvas(pixels, parse_extend(extend) if isinstance(extend, str) else dict(extend))
        elif mask_image is not None:
            mask = load_mask(mask_image, cfg.data.image_size, strict=strict)
        if pixels.shape[0] not in (1, n) or (mask is not None and mask.shape[0] not in (1, n)):
            raise ConfigError(f"--init-image/--mask: give one image (and mask) or one per sample ({n})")
        pixels = pixels.expand(n, -1, -1, -1)
        if mask is not None:
            mask = mask.expand(n, -1, -1, -1)
            mask, note = prepare_mask(mask, pixels[:, :1])  # one channel, checked per sample
            if note:
                warnings.warn(note, stacklevel=3)
        if strength is None and mask is None:
            strength = DEFAULT_STRENGTH
        target = pixels
        if cfg.data.latent_channels:  # work on latents; a latent cell is regenerated if any of its pixels is
            target = self.vae.encode(pixels.to(self.device), generator=torch.Generator().manual_seed(0)).float().cpu()
            if mask is not None:
                f = cfg.data.vae_downsample or 1
                mask = torch.nn.functional.max_pool2d(mask, kernel_size=f, stride=f)
        return Control(target, mask, strength, jump_length, jump_n_sample)

    def _draw(
        self, labels: Optional[list[int]], generators: Any, *, sampler: str, steps: int, scale: float,
        spacing: Optional[str], options: dict[str, Any], guide_channels: Optional[int], batch_size: int,
        trajectory_points: int, progress: Optional[Callable[[int], None]], step_cache: Optional[StepCache] = None,
        control: Optional[Control] = None, guidance_map: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int], dict[str, torch.Tensor]]:
        """This process's samples through ``sample_batches``: ``(tensors (N, C, H, W), trajectory or
        None, steps, extras)``; extras: ``xt`` (the states at the trajectory steps), ``guidance``
        (maps). ``step_cache`` (reset per batch: one trajectory each) wraps the network's block
        stack; ``control`` replaces plain sampling by SDEdit / inpainting (``_controlled``)."""
        cfg = self.cfg
        channels, size = model_input_shape(cfg)
        latent = bool(cfg.data.latent_channels)
        if guide_channels is None:
            guide_channels = cfg.sample.guide_channels if cfg.sample.guide_channels is not None else channels
        out_channels = getattr(self.model, "out_channels", channels)
        if not 1 <= guide_channels <= out_channels:
            raise ConfigError(f"--guide-channels {guide_channels}: the model outputs {out_channels} channels; use 1..{out_channels}")
        calls = control.network_calls(steps) if control is not None else steps  # SDEdit cuts, jumps add
        traj_idx = trajectory_indices(calls, trajectory_points) if trajectory_points and calls else []
        n = len(labels) if labels is not None else (len(generators) if isinstance(generators, list) else None)
        if n is None:
            raise ConfigError("an unconditional model sampled with one shared generator needs num_samples")
        announce_total(progress, calls * math.ceil(n / batch_size))  # this process's network calls
        recorder = TrajectoryRecorder(traj_idx, clamp_xt=not latent, clamp_x0=not latent)  # latents: decoded below
        maps = GuidanceMaps(channels) if guidance_map else None
        hooks: list[BatchHook] = [StepCaching(self.model, step_cache)] if step_cache is not None else []
        if maps is not None:
            hooks.append(maps)
        draw = self._control_draw(control, sampler, spacing, steps, options) if control is not None else None
        finish = self.finish_images()
        tensors = self.sample_batches(labels, generators, n, (channels, size, size), sampler=sampler, steps=steps,
                                      scale=scale, spacing=spacing, options=options, batch_size=batch_size,
                                      guide_channels=guide_channels, callback=recorder.callback(progress),
                                      finish=finish, hooks=hooks, draw=draw)
        # (N, K, C, H, W); latents through the VAE as the samples (its pixels come back in [-1, 1])
        trajectory, xt = recorder.stack(finish)
        extras = {}
        if xt is not None:
            extras["xt"] = xt
        if maps is not None and maps.maps:
            extras["guidance"] = torch.cat(maps.maps)
        return tensors, trajectory, traj_idx, extras

    def _control_draw(self, control: Control, sampler: str, spacing: Optional[str], steps: int,
                      options: dict[str, Any]) -> Callable[..., torch.Tensor]:
        """``sample_batches``' ``draw(lo, hi, net, x_T, generators, callback)`` for ``control``: the
        sampler's grid and the objective's inpainting adapter fixed once, rows ``lo:hi`` of the image."""
        objective = self.objective
        sampler_fn, grid = SAMPLERS.get(sampler).obj, self.grid_options(sampler, spacing)
        grid_args = objective.sampling_grid(steps, **grid)
        adapter = adapter_for(objective.family, getattr(objective, "alphas_cumprod", None))
        if grid.get("zero_is_data"):  # the Gaussian solvers' grid ends at the data, like flow and edm
            adapter = dataclasses.replace(adapter, grid_ends_at_data=True)

        def draw(lo: int, hi: int, net: Callable[..., torch.Tensor], x_T: torch.Tensor, gens: Any,
                 callback: Any) -> torch.Tensor:
            return self._controlled(control, lo, hi, sampler_fn, objective.denoiser(net), x_T, grid_args, adapter,
                                    gens, callback, options)

        return draw

    @staticmethod
    def _controlled(
        control: Control, lo: int, hi: int, sampler_fn: Callable[..., torch.Tensor], denoiser: Callable[..., Any],
        x_T: torch.Tensor, grid_args: tuple, adapter: Any, gens: Any, callback: Callable[..., None],
        options: dict[str, Any],
    ) -> torch.Tensor:
        """Samples ``lo:hi`` with the user's image: SDEdit start (``strength``), then plain or
        inpainting sampling (``mask``) over the (cut) grid."""
        image = control.image[lo:hi].to(x_T.device, x_T.dtype)
        start, grid = x_T, grid_args
        if control.strength is not None:
            levels = grid_args[-1]
            noise = x_T / adapter.prior_std(float(levels[0]))
            cut, start = sdedit_start(image, levels, control.strength, noise, adapter)
            if len(cut) - int(adapter.grid_ends_at_data) < 1:  # strength too small for a single step
                return image
            grid = (*grid_args[:-1], cut)
        if control.mask is None:
            return sampler_fn(denoiser, start, *grid, generator=gens, callback=callback, **options)
        mask = control.mask[lo:hi].to(x_T.device, x_T.dtype).expand_as(image)
        return inpaint(sampler_fn, denoiser, start, *grid, image=image, mask=mask, adapter=adapter, generator=gens,
                       callback=callback, jump_length=control.jump_length, jump_n_sample=control.jump_n_sample, **options)

    def _draw_distributed(
        self, labels: Optional[list[int]], generators: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
        """``_draw`` shared by the processes of the default process group (torchrun; see
        ``ditkit.train.distributed.setup_sampling``). Rank ``r`` of ``W`` draws the contiguous share
        ``[r N / W, (r + 1) N / W)`` of the samples; rank 0 gathers the shares in order and returns
        all ``N``: the ones one process draws with the same seeds, since each sample depends only
        on its own seed and label. The other ranks get their own share."""
        import torch.distributed as dist

        if not isinstance(generators, list):
            raise ConfigError("distributed sampling needs one generator per sample (pass seed, not one generator)")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        n = len(generators)
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        share = None
        if hi > lo:
            control = kwargs.pop("control", None)
            if control is not None:  # this rank's rows of the user's image and mask
                control = dataclasses.replace(control, image=control.image[lo:hi],
                                              mask=None if control.mask is None else control.mask[lo:hi])
            share = self._draw(None if labels is None else labels[lo:hi], generators[lo:hi], control=control, **kwargs)
        shares: Optional[list[Any]] = [None] * world_size if rank == 0 else None
        dist.gather_object(share, shares, dst=0)
        if rank != 0:
            return share if share is not None else (torch.empty(0), None, [], {})
        parts = [p for p in shares or [] if p is not None]
        trajectory = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
        extras = {key: torch.cat([p[3][key] for p in parts]) for key in parts[0][3]}
        return torch.cat([p[0] for p in parts]), trajectory, parts[0][2], extras

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        super().add_cli_arguments(parser)  # --lora
        parser.add_argument("--guide-channels", type=int, help="guide only the first N output channels")
        parser.add_argument("--ddim-eta", type=float, help="samplers that take eta (DDIM)")
        parser.add_argument("--timestep-spacing", choices=["uniform", "quadratic"],
                            help="gaussian samplers (default: the checkpoint's)")
        parser.add_argument("--vae", metavar="DIR",
                            help="latent models: AutoencoderKL folder to decode with (default: the recorded one)")
        parser.add_argument("--npz", action="store_true", help="also write samples.npz (ADM evaluator: arr_0 uint8 NxHxWxC)")
        cls.add_trajectory_arguments(parser)
        parser.add_argument("--nrow", type=int, help="images per grid row")
        parser.add_argument("--init-image", metavar="PNG", help="start from this image: image-to-image, or inpainting with --mask")
        parser.add_argument("--mask", metavar="PNG", help="with --init-image: white = regenerate, black = keep (RePaint)")
        parser.add_argument("--strength", type=float, help="image-to-image strength in (0, 1] (default 0.8; 1 = plain sampling)")
        parser.add_argument("--extend", metavar="SIDE=PX,...", help="with --init-image: outpaint, e.g. left=16,top=8")
        parser.add_argument("--jump-length", type=int, metavar="J",
                            help="inpainting: RePaint resampling, jump back J levels (with --jump-n-sample; RePaint: 10)")
        parser.add_argument("--jump-n-sample", type=int, metavar="R",
                            help="inpainting: RePaint resampling, R passes per jump (1 = off, the default; RePaint: 10)")
        parser.add_argument("--guidance-map", action="store_true", help="also write guidance_map.png: where guidance acted")
        parser.add_argument("--strict", action="store_true", help="refuse an image or mask of another size instead of resizing")
        parser.add_argument("--c2pa-cert", metavar="PEM", help="sign every PNG with C2PA Content Credentials (with --c2pa-key)")
        parser.add_argument("--c2pa-key", metavar="PEM", help="the private key of --c2pa-cert")
        parser.add_argument("--cache", metavar="SPEC",
                            help="step caching: fora:N (recompute every N calls) or teacache:T (threshold); default none")

    @classmethod
    def cli_extras(cls, args: Any) -> dict[str, Any]:
        return {**super().cli_extras(args), **({"vae": args.vae} if args.vae is not None else {})}

    def cli_call(self, args: Any, distributed: bool = False) -> ImagePipelineOutput:
        with sampling_progress() as progress:
            return self(
                class_labels=args.class_labels, num_samples=args.num_samples, sampler=args.sampler,
                num_inference_steps=args.num_sampling_steps, guidance_scale=args.cfg_scale,
                guide_channels=args.guide_channels, eta=args.ddim_eta, seed=args.seed, batch_size=args.batch_size,
                trajectory_points=self.trajectory_points_of(args),
                timestep_spacing=args.timestep_spacing, allow_untrained_uncond=args.allow_untrained_uncond,
                distributed=distributed, progress=progress, cache=getattr(args, "cache", None),
                image=args.init_image, mask_image=args.mask, strength=args.strength, extend=args.extend,
                guidance_map=args.guidance_map, strict=args.strict,
                jump_length=1 if args.jump_length is None else args.jump_length,
                jump_n_sample=1 if args.jump_n_sample is None else args.jump_n_sample,
            )

    def cli_save(self, output: ImagePipelineOutput, args: Any, out_dir: Path) -> list[Path]:
        nrow, given = args.nrow, args.class_labels
        if nrow is None and output.labels is not None and given and len(given) > 1 and len(output.labels) % len(given) == 0:
            nrow = len(given)  # one row per repetition of the labels asked for
        if (args.c2pa_cert is None) != (args.c2pa_key is None):
            raise ConfigError("--c2pa-cert and --c2pa-key go together: give both (ditkit credentials init DIR makes a test pair)")
        written = output.save(out_dir, nrow=nrow, npz=args.npz)
        if args.c2pa_cert is None:
            print("C2PA content credentials: off (pass --c2pa-cert and --c2pa-key to sign the PNGs)", file=sys.stderr)
            return written
        from ditkit.provenance import generation_manifest, sign_png

        meta = output.metadata
        for path in written:
            if path.suffix == ".png":
                index = int(path.stem) if path.stem.isdigit() else None
                manifest = generation_manifest(
                    model=meta["model"], checkpoint_sha256=meta.get("checkpoint_sha256") or None,
                    sampler={"name": meta["sampler"], "num_inference_steps": int(meta["num_sampling_steps"]),
                             "guidance_scale": float(meta["cfg_scale"])},
                    seed=None if index is None or output.seeds is None else output.seeds[index],
                    title=path.name, extra={"checkpoint": meta.get("checkpoint"), "step": meta.get("step"),
                                            "weights": meta.get("weights")},
                )
                sign_png(path, path, manifest, args.c2pa_cert, args.c2pa_key)
        print(f"C2PA content credentials: signed {sum(p.suffix == '.png' for p in written)} PNGs "
              f"(check with: ditkit verify {written[0]})", file=sys.stderr)
        return written

    def cli_summary(self, output: ImagePipelineOutput) -> str:
        line = super().cli_summary(output)
        if output.is_latent:
            shape = tuple(output.tensors.shape[1:])
            line += (f"\nlatents {shape} written as latents.npz (arr_0: float32 latents in DiT space). No VAE: no PNGs; "
                     "pass --vae PATH (a local AutoencoderKL folder) to decode images")
        return line

    def write_training_samples(self, path_stem: Path) -> Path:
        """A grid of ``sample.num_samples`` images (labels cycling over the classes, fixed seeds,
        so grids of successive steps compare) at ``path_stem.png``; leaves the caller's RNGs as
        they were."""
        cfg = self.cfg
        n, k = cfg.sample.num_samples, self.num_classes
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = self(num_samples=n, allow_untrained_uncond=True) if k == 0 else self(
                class_labels=[i % k for i in range(n)], num_samples=n, allow_untrained_uncond=True
            )
        path = path_stem.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        nrow = k if k and k <= 16 and n % k == 0 else None
        grid = make_grid(out.tensors, nrow=nrow, scale=display_scale(cfg.data.image_size))
        save_png(grid, path, {"step": path.stem, "model": cfg.model.name})
        return path

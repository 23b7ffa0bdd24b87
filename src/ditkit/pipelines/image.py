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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ditkit.builders import build_objective, default_sampler
from ditkit.builders.dit import model_input_shape
from ditkit.config import Config, ConfigError
from ditkit.media import display_scale, make_grid, save_png, to_pil, to_uint8
from ditkit.pipelines.base import GeneratorArg, Pipeline, generator_slice, resolve_generators
from ditkit.registry import PIPELINES, SAMPLERS
from ditkit.samplers.guidance import classifier_free_guidance

__all__ = ["ImagePipeline", "ImagePipelineOutput", "sampling_clip_x0", "trajectory_indices"]


def sampling_clip_x0(cfg: Config) -> Optional[float]:
    """The x0 clamp of gaussian sampling: ``objective.clip_x0``, auto (None) = 1 for pixel data in
    [-1, 1] (ADM's clip_denoised), no clipping for latents (official DiT); 0 = no clipping."""
    clip = cfg.objective.clip_x0
    if clip is None:
        return None if cfg.data.latent_channels else 1.0
    return clip or None


def trajectory_indices(num_steps: int, count: int) -> list[int]:
    """``count`` step indices spread over ``0..num_steps-1`` (always including the last)."""
    count = min(count, num_steps)
    return sorted({round(i * (num_steps - 1) / max(count - 1, 1)) for i in range(count)})


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
            np.savez(out / "latents.npz", **arrays)
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
            np.savez(out / "samples.npz", **arrays)
            written.append(out / "samples.npz")
        if self.trajectory is not None:
            traj = self.trajectory[: min(8, len(self.trajectory))]  # (n, K, C, H, W): rows = samples
            n, k = traj.shape[:2]
            strip = make_grid(traj.reshape(n * k, *traj.shape[2:]), nrow=k, scale=scale)
            steps = " ".join(map(str, self.trajectory_steps))
            save_png(strip, out / "trajectory.png",
                     {**self.metadata, "trajectory_steps": steps, "layout": "rows: samples, columns: steps"})
            written.append(out / "trajectory.png")
        return written


@PIPELINES.register("image")
class ImagePipeline(Pipeline):
    """Class-conditional / unconditional image DiT, pixel or latent (see the module docstring)."""

    modality = "image"
    supports_distributed = True

    def __init__(self, model: torch.nn.Module, cfg: Config, *, vae: Optional[Any] = None, **kwargs: Any) -> None:
        super().__init__(model, cfg, **kwargs)
        if isinstance(vae, (str, Path)) or (vae is None and cfg.data.latent_channels and cfg.data.vae):
            vae = load_decoder(cfg, vae, self.device)
        self.vae = vae  # a LatentVAE that decodes a latent model's samples, or None

    @classmethod
    def check_extras(cls, cfg: Config, vae: Optional[str | Path] = None, **extras: Any) -> None:
        super().check_extras(cfg, **extras)
        if vae is not None and not cfg.data.latent_channels:
            raise ConfigError(f"--vae {vae}: this checkpoint is a pixel-space model; drop --vae")

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

        Raises ``ConfigError`` for labels outside the classes, a sampler that does not fit the
        objective, guidance on a model whose unconditional branch was never trained (unless
        ``allow_untrained_uncond``: a warning), and bad steps / scales / batch sizes.
        """
        cfg = self.cfg
        labels, n = self.resolve_labels(class_labels, num_samples)
        sampler, steps, scale, spacing = self.check_options(sampler, num_inference_steps, guidance_scale, timestep_spacing)
        self.check_guidance(scale if labels is not None else 1.0, allow_untrained_uncond)
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        seed = cfg.sample.seed if seed is None else seed
        seeds, generators = resolve_generators(n, seed, generator)
        options = self._sampler_options(sampler, eta)
        draw = self._draw_distributed if distributed else self._draw
        tensors, trajectory, traj_idx = draw(
            labels, generators, sampler=sampler, steps=steps, scale=scale, spacing=spacing, options=options,
            guide_channels=guide_channels, batch_size=batch_size, trajectory_points=trajectory_points, progress=progress,
        )
        is_latent = bool(cfg.data.latent_channels) and self.vae is None
        metadata = self.provenance()
        metadata.update({"sampler": sampler, "num_sampling_steps": str(steps), "cfg_scale": str(scale)})
        metadata["seed"] = str(seed) if seeds is not None else "caller's generator"
        for key, value in options.items():
            metadata[key] = str(value)
        if spacing is not None:
            metadata["timestep_spacing"] = spacing
        if cfg.data.latent_channels:
            metadata["output"] = "latents (no VAE to decode)" if is_latent else "decoded latents"
            if self.vae is not None:
                metadata["vae"] = str(self.vae.path)
        if labels is not None:
            metadata["labels"] = " ".join(map(str, labels))
        images = [] if is_latent else to_pil(tensors)
        return ImagePipelineOutput(images, tensors, labels, seeds, metadata, list(self.class_names), trajectory,
                                   traj_idx, is_latent)

    def _sampler_options(self, sampler: str, eta: Optional[float]) -> dict[str, Any]:
        accepted = SAMPLERS.get(sampler).meta.get("options", ())
        options: dict[str, Any] = {}
        if "eta" in accepted:
            options["eta"] = self.cfg.sample.ddim_eta if eta is None else eta
        elif eta is not None:
            raise ConfigError(f"--ddim-eta applies to samplers that take eta; {sampler} does not")
        return options

    def _draw(
        self, labels: Optional[list[int]], generators: Any, *, sampler: str, steps: int, scale: float,
        spacing: Optional[str], options: dict[str, Any], guide_channels: Optional[int], batch_size: int,
        trajectory_points: int, progress: Optional[Callable[[int], None]],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
        """The sampling loop on this process: ``(tensors (N, C, H, W), trajectory or None, steps)``."""
        cfg, device, objective = self.cfg, self.device, self.objective
        channels, size = model_input_shape(cfg)
        latent = bool(cfg.data.latent_channels)
        finish = (lambda z: self.vae.decode_to(z, cfg.data.channels)) if latent and self.vae is not None else None
        if guide_channels is None:
            guide_channels = cfg.sample.guide_channels if cfg.sample.guide_channels is not None else channels
        out_channels = getattr(self.model, "out_channels", channels)
        if not 1 <= guide_channels <= out_channels:
            raise ConfigError(f"--guide-channels {guide_channels}: the model outputs {out_channels} channels; use 1..{out_channels}")
        entry = SAMPLERS.get(sampler)
        sampler_fn = entry.obj
        grid: dict[str, Any] = {"timestep_spacing": spacing} if spacing is not None else {}
        if entry.meta.get("zero_is_data"):  # the solver's grid ends at the data: one more point, same calls
            grid["zero_is_data"] = True
        forward = self.forward_fn()
        traj_idx = trajectory_indices(steps, trajectory_points) if trajectory_points else []
        n = len(labels) if labels is not None else (len(generators) if isinstance(generators, list) else None)
        if n is None:
            raise ConfigError("an unconditional model sampled with one shared generator needs num_samples")
        out_images, out_traj = [], []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            gens = generator_slice(generators, lo, hi)
            x_T = objective.prior((hi - lo, channels, size, size), gens, device)
            y = torch.tensor(labels[lo:hi], dtype=torch.long, device=device) if labels is not None else None
            if y is not None and scale != 1.0:
                net = classifier_free_guidance(forward, y, scale, null_class=self.num_classes, guide_channels=guide_channels)
            else:
                net = lambda x, t, y=y: forward(x, t, y)  # noqa: E731
            recorded: list[torch.Tensor] = []

            def callback(i: int, x: torch.Tensor, x0_pred: torch.Tensor) -> None:
                if i in traj_idx:
                    recorded.append(x0_pred.float().cpu() if latent else x0_pred.float().clamp(-1, 1).cpu())
                if progress is not None:
                    progress(1)

            x0 = objective.sample(sampler_fn, net, x_T, steps, generator=gens, callback=callback, **grid, **options)
            if finish is not None:  # latents -> pixels through the VAE
                out_images.append(finish(x0.float()))
                recorded = [finish(r) for r in recorded]
            else:
                out_images.append(x0.float().cpu() if latent else x0.float().clamp(-1, 1).cpu())
            if recorded:
                out_traj.append(torch.stack(recorded, dim=1))  # (b, K, C, H, W)
        trajectory = torch.cat(out_traj) if out_traj else None
        return torch.cat(out_images), trajectory, traj_idx

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
            share = self._draw(None if labels is None else labels[lo:hi], generators[lo:hi], **kwargs)
        shares: Optional[list[Any]] = [None] * world_size if rank == 0 else None
        dist.gather_object(share, shares, dst=0)
        if rank != 0:
            return share if share is not None else (torch.empty(0), None, [])
        parts = [p for p in shares or [] if p is not None]
        trajectory = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
        return torch.cat([p[0] for p in parts]), trajectory, parts[0][2]

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        parser.add_argument("--guide-channels", type=int, help="guide only the first N output channels")
        parser.add_argument("--ddim-eta", type=float, help="samplers that take eta (DDIM)")
        parser.add_argument("--timestep-spacing", choices=["uniform", "quadratic"],
                            help="gaussian samplers (default: the checkpoint's)")
        parser.add_argument("--vae", metavar="DIR",
                            help="latent models: AutoencoderKL folder to decode with (default: the recorded one)")
        parser.add_argument("--npz", action="store_true", help="also write samples.npz (ADM evaluator: arr_0 uint8 NxHxWxC)")
        parser.add_argument("--trajectory", action="store_true", help="also write trajectory.png: x0 predictions along the way")
        parser.add_argument("--trajectory-points", type=int, help="steps shown in trajectory.png (default 8)")
        parser.add_argument("--nrow", type=int, help="images per grid row")

    @classmethod
    def cli_extras(cls, args: Any) -> dict[str, Any]:
        return {"vae": args.vae} if args.vae is not None else {}

    def cli_call(self, args: Any, distributed: bool = False) -> ImagePipelineOutput:
        from ditkit.progress import progress_bar

        _, n = self.resolve_labels(args.class_labels, args.num_samples)
        _, steps, _, _ = self.check_options(args.sampler, args.num_sampling_steps, args.cfg_scale, args.timestep_spacing)
        with progress_bar(steps * math.ceil(n / args.batch_size), "sampling") as bar:
            return self(
                class_labels=args.class_labels, num_samples=args.num_samples, sampler=args.sampler,
                num_inference_steps=args.num_sampling_steps, guidance_scale=args.cfg_scale,
                guide_channels=args.guide_channels, eta=args.ddim_eta, seed=args.seed, batch_size=args.batch_size,
                trajectory_points=(args.trajectory_points or 8) if args.trajectory else 0,
                timestep_spacing=args.timestep_spacing, allow_untrained_uncond=args.allow_untrained_uncond,
                distributed=distributed, progress=bar.update,
            )

    def cli_save(self, output: ImagePipelineOutput, args: Any, out_dir: Path) -> list[Path]:
        nrow, given = args.nrow, args.class_labels
        if nrow is None and output.labels is not None and given and len(given) > 1 and len(output.labels) % len(given) == 0:
            nrow = len(given)  # one row per repetition of the labels asked for
        return output.save(out_dir, nrow=nrow, npz=args.npz)

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


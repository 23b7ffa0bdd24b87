"""Generate images from a trained DiT: build the objective's denoiser, the classifier-free guidance
wrapper and the sampler from a config, run them with per-sample seeds, and write PNGs.

Used by ``ditkit sample``, by the training loop's sample grids, and by eval/serve.

* ``build_model(cfg)`` / ``build_objective(cfg.objective)``: a config to a network / objective.
* ``load_model(ckpt)``: a checkpoint directory (or run directory) to ``(model, cfg)``.
* ``sample_images(model, cfg, labels, seeds, ...)``: the core loop on a model in memory.
* ``generate(ckpt, ...)``: the whole thing from a checkpoint, returning images in [-1, 1] and
  the metadata that identifies them.

Sample ``i`` draws all its noise from ``torch.Generator().manual_seed(seed + i)``, so results do
not depend on the batch size or on which other samples are drawn with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import ditkit
from ditkit.config import Config, ConfigError
from ditkit.diffusion import FlowMatching, GaussianDiffusion, make_schedule, space_timesteps
from ditkit.models.dit import DIT_PRESETS, DiT
from ditkit.samplers import classifier_free_guidance, ddim, ddpm, dpm_solver_pp_2m, euler, flow_timesteps, heun
from ditkit.samplers.noise import randn
from ditkit.checkpoint_io import (
    checkpoint_facts,
    load_checkpoint_config,
    load_weights,
    resolve_checkpoint,
    weights_sha256,
)
from ditkit.device import autocast, resolve_device, resolve_precision

__all__ = [
    "GAUSSIAN_SAMPLERS",
    "FLOW_SAMPLERS",
    "model_kwargs",
    "build_model",
    "build_objective",
    "load_model",
    "default_sampler",
    "check_sampling_options",
    "resolve_labels",
    "sample_images",
    "sample_images_distributed",
    "GenerateResult",
    "generate",
    "ImageGenerator",
    "model_input_shape",
    "sampling_clip_x0",
    "resolve_timestep_spacing",
    "load_decoder",
    "to_uint8",
    "make_grid",
    "save_png",
]

GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpm++")
FLOW_SAMPLERS = ("euler", "heun")


# ---- config -> model / objective ----------------------------------------------------------------


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """``DiT(**kwargs)`` for a config: preset values, then non-None ``cfg.model`` fields, then the
    sizes the data and objective decide (``input_size``, ``in_channels``, ``num_classes``,
    ``learn_sigma``). Raises ``ConfigError`` for an unknown preset or impossible sizes."""
    m = cfg.model
    if m.name not in DIT_PRESETS:
        raise ConfigError(f"--model {m.name!r} is not a preset; choose one of: {', '.join(DIT_PRESETS)}")
    kwargs = dict(DIT_PRESETS[m.name])
    kwargs.update({k: v for k, v in dataclasses.asdict(m).items() if k != "name" and v is not None})
    patch = kwargs["patch_size"]
    in_channels, input_size = model_input_shape(cfg)
    if input_size % patch:
        unit = patch * (cfg.data.vae_downsample or 1) if cfg.data.latent_channels else patch
        lower = cfg.data.image_size // unit * unit
        raise ConfigError(
            f"--image-size {cfg.data.image_size} is not divisible by the patch size {patch} of {m.name}"
            + (f" times the VAE downsampling {cfg.data.vae_downsample}" if cfg.data.latent_channels else "")
            + f": use --image-size {lower or unit} or {lower + unit}, or a model with a smaller patch"
        )
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(
            f"model.hidden_size={kwargs['hidden_size']} is not divisible by model.num_heads={kwargs['num_heads']}"
        )
    if cfg.data.channels is None or cfg.data.num_classes is None:
        raise ConfigError("data.channels and data.num_classes must be known to build the model (set by training)")
    kwargs.update(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=cfg.data.num_classes,
        learn_sigma=cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma,
    )
    return kwargs


def model_input_shape(cfg: Config) -> tuple[Optional[int], int]:
    """``(channels, side)`` of what the DiT sees: the images, or the VAE latents of a latent model
    (``data.latent_channels`` set by ``--vae`` training or by ``import-dit``)."""
    d = cfg.data
    if d.latent_channels:
        return d.latent_channels, d.image_size // (d.vae_downsample or 1)
    return d.channels, d.image_size


def sampling_clip_x0(cfg: Config) -> Optional[float]:
    """The x0 clamp of gaussian sampling: ``objective.clip_x0``, auto (None) = 1 for pixel data in
    [-1, 1] (ADM's clip_denoised), no clipping for latents (official DiT); 0 = no clipping."""
    clip = cfg.objective.clip_x0
    if clip is None:
        return None if cfg.data.latent_channels else 1.0
    return clip or None


def resolve_timestep_spacing(cfg: Config, sampler: str, spacing: Optional[str] = None) -> str:
    """The timestep spacing of a gaussian ``sampler``: ``spacing`` if given, else
    ``sample.timestep_spacing``. ``uniform`` is the official respacing; ``quadratic`` puts the steps
    densely near the data (docs/eval.md: it helps DPM-Solver++ slightly at 25 steps on the digits
    model and hurts at 10, so uniform is the default)."""
    spacing = spacing or cfg.sample.timestep_spacing
    if spacing not in ("uniform", "quadratic"):
        raise ConfigError(f"--timestep-spacing {spacing}: use uniform or quadratic")
    return spacing


def build_model(cfg: Config) -> DiT:
    """A freshly initialised DiT for ``cfg`` (fp32, CPU); a ``TextDiT`` for text configs."""
    if cfg.modality == "text":
        from ditkit.text_sampling import build_text_model

        return build_text_model(cfg)  # type: ignore[return-value]
    return DiT(**model_kwargs(cfg))


def build_objective(cfg: Config, clip_x0: Optional[float] = None) -> GaussianDiffusion | FlowMatching:
    """The objective of ``cfg.objective``. ``clip_x0`` (gaussian only) clamps the denoiser's x0
    prediction at sampling time (pixel models: 1.0)."""
    o = cfg.objective
    if o.kind == "gaussian":
        return GaussianDiffusion(
            make_schedule(o.schedule, o.num_timesteps), prediction=o.prediction, learn_sigma=o.learn_sigma, clip_x0=clip_x0
        )
    if o.kind == "flow":  # clip_x0 does not apply: the flow samplers integrate the velocity
        return FlowMatching(time_sampling=o.time_sampling)
    if cfg.modality == "text":
        from ditkit.text_sampling import build_text_objective

        return build_text_objective(cfg)  # type: ignore[return-value]
    raise ConfigError(f"objective.kind={o.kind!r}: use gaussian or flow")


def load_model(ckpt: str | Path, use_ema: bool = True) -> tuple[DiT, Config, Path]:
    """``(model in eval mode on CPU, its config, the resolved checkpoint directory)``."""
    ckpt_dir = resolve_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt_dir)
    model = build_model(cfg)
    state = load_weights(ckpt_dir, "ema" if use_ema else "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt_dir}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), cfg, ckpt_dir


# ---- sampling ------------------------------------------------------------------------------------


def default_sampler(cfg: Config) -> str:
    """``sample.sampler`` with ``auto`` resolved: dpm++ for gaussian objectives, heun for flow."""
    name = cfg.sample.sampler
    if name == "auto":
        return "dpm++" if cfg.objective.kind == "gaussian" else "heun"
    return name


def resolve_labels(
    num_classes: int, class_labels: Optional[Sequence[int]], num_samples: Optional[int]
) -> tuple[Optional[list[int]], int]:
    """``(labels per sample or None, number of samples)``.

    Conditional model: labels default to ``0, 1, ..., num_classes - 1, 0, ...``; given labels are
    checked against the range and repeated to ``num_samples``. Unconditional: labels are refused.
    """
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples {num_samples}: must be at least 1")
    if num_classes == 0:
        if class_labels:
            raise ConfigError("this checkpoint is unconditional (trained without labels): drop --class-labels")
        return None, num_samples or 16
    if not class_labels:
        n = num_samples or 16
        return [i % num_classes for i in range(n)], n
    for label in class_labels:
        if not 0 <= label < num_classes:
            raise ConfigError(
                f"class label {label} is outside this checkpoint's classes 0..{num_classes - 1}: "
                f"pass --class-labels between 0 and {num_classes - 1}"
            )
    n = num_samples or len(class_labels)
    return [class_labels[i % len(class_labels)] for i in range(n)], n


def check_sampling_options(
    cfg: Config, sampler: Optional[str], num_sampling_steps: Optional[int], cfg_scale: Optional[float]
) -> tuple[str, int, float]:
    """``(sampler, steps, cfg_scale)`` with None taken from ``cfg.sample``, checked against the
    objective; ``ConfigError`` says what to change."""
    if cfg.modality == "text":
        raise ConfigError(f"{cfg.model.name} is a text model: sample it with ditkit.text_sampling.generate_text (ditkit sample does)")
    sampler = default_sampler(cfg) if sampler in (None, "auto") else sampler
    steps = cfg.sample.num_sampling_steps if num_sampling_steps is None else num_sampling_steps
    cfg_scale = cfg.sample.cfg_scale if cfg_scale is None else cfg_scale
    allowed = GAUSSIAN_SAMPLERS if cfg.objective.kind == "gaussian" else FLOW_SAMPLERS
    if sampler not in allowed:
        raise ConfigError(f"--sampler {sampler} does not fit a {cfg.objective.kind} model: use one of {', '.join(allowed)}")
    if steps < 1:
        raise ConfigError(f"--num-sampling-steps {steps}: must be at least 1")
    if cfg.objective.kind == "gaussian" and steps > cfg.objective.num_timesteps:
        raise ConfigError(f"--num-sampling-steps {steps} exceeds the {cfg.objective.num_timesteps} training steps")
    if cfg_scale < 0:
        raise ConfigError(f"--cfg-scale {cfg_scale}: use a value >= 0 (1 = no guidance)")
    return sampler, steps, cfg_scale


def _trajectory_indices(num_steps: int, count: int) -> list[int]:
    """``count`` step indices spread over ``0..num_steps-1`` (always including the last)."""
    count = min(count, num_steps)
    return sorted({round(i * (num_steps - 1) / max(count - 1, 1)) for i in range(count)})


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    cfg: Config,
    labels: Optional[Sequence[int]],
    seeds: Sequence[int],
    *,
    sampler: Optional[str] = None,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    guide_channels: Optional[int] = None,
    ddim_eta: Optional[float] = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trajectory_points: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    timestep_spacing: Optional[str] = None,
    vae: Optional[Any] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
    """Draw ``len(seeds)`` images with ``model`` (already on ``device``, eval mode).

    Options left None come from ``cfg.sample``. Returns ``(images (N, C, H, W) float32 in
    [-1, 1] on CPU, trajectory (N, K, C, H, W) of x0 predictions or None, the K step indices)``.
    A latent model (``data.latent_channels``) decodes through ``vae`` (a ``ditkit.interop.LatentVAE``)
    to ``data.channels``; without one it returns the latents ``(N, c, h, w)`` unclamped.
    Guidance (``cfg_scale`` != 1, conditional models) is applied by default to the mean-prediction
    channels only (``guide_channels`` = C; the learned-variance channels stay conditional).
    """
    s = cfg.sample
    sampler, steps, cfg_scale = check_sampling_options(cfg, sampler, num_sampling_steps, cfg_scale)
    eta = s.ddim_eta if ddim_eta is None else ddim_eta
    device = torch.device(device)
    channels, size = model_input_shape(cfg)
    num_classes = cfg.data.num_classes
    latent = bool(cfg.data.latent_channels)
    finish = (lambda z: vae.decode_to(z, cfg.data.channels)) if latent and vae is not None else None
    objective = build_objective(cfg, clip_x0=sampling_clip_x0(cfg))
    if guide_channels is None:
        guide_channels = s.guide_channels if s.guide_channels is not None else channels
    out_channels = 2 * channels if cfg.objective.kind == "gaussian" and cfg.objective.learn_sigma else channels
    if not 1 <= guide_channels <= out_channels:
        raise ConfigError(f"--guide-channels {guide_channels}: the model outputs {out_channels} channels; use 1..{out_channels}")
    out_images, out_traj = [], []
    traj_idx = _trajectory_indices(steps, trajectory_points) if trajectory_points else []

    def forward(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        with autocast(device, dtype):
            return model(x, t, y).float()

    for lo in range(0, len(seeds), batch_size):
        chunk = list(seeds[lo : lo + batch_size])
        generators = [torch.Generator().manual_seed(int(seed)) for seed in chunk]
        x_T = randn((len(chunk), channels, size, size), generators, device=device)
        y = None
        if num_classes and labels is not None:
            y = torch.tensor(list(labels[lo : lo + batch_size]), dtype=torch.long, device=device)
        if y is not None and cfg_scale != 1.0:
            net = classifier_free_guidance(forward, y, cfg_scale, null_class=num_classes, guide_channels=guide_channels)
        else:
            net = lambda x, t, y=y: forward(x, t, y)  # noqa: E731
        recorded: list[torch.Tensor] = []

        def callback(i: int, x: torch.Tensor, x0_pred: torch.Tensor) -> None:
            if i in traj_idx:
                recorded.append(x0_pred.float().cpu() if latent else x0_pred.float().clamp(-1, 1).cpu())
            if progress is not None:
                progress(1)

        if cfg.objective.kind == "gaussian":
            denoiser = objective.denoiser(net)
            spacing = resolve_timestep_spacing(cfg, sampler, timestep_spacing)
            timesteps = space_timesteps(cfg.objective.num_timesteps, steps, spacing)
            abar = objective.alphas_cumprod
            if sampler == "ddpm":
                x0 = ddpm(denoiser, x_T, abar, timesteps, generator=generators, callback=callback)
            elif sampler == "ddim":
                x0 = ddim(denoiser, x_T, abar, timesteps, eta=eta, generator=generators, callback=callback)
            else:
                x0 = dpm_solver_pp_2m(denoiser, x_T, abar, timesteps, callback=callback)
        else:
            velocity = objective.denoiser(net)
            ts = flow_timesteps(steps)
            x0 = (euler if sampler == "euler" else heun)(velocity, x_T, ts, callback=callback)
        if finish is not None:  # latents -> pixels through the VAE
            out_images.append(finish(x0.float()))
            recorded = [finish(r) for r in recorded]
        else:
            out_images.append(x0.float().cpu() if latent else x0.float().clamp(-1, 1).cpu())
        if recorded:
            out_traj.append(torch.stack(recorded, dim=1))  # (b, K, C, H, W)
    images = torch.cat(out_images)
    trajectory = torch.cat(out_traj) if out_traj else None
    return images, trajectory, traj_idx


def sample_images_distributed(
    model: torch.nn.Module, cfg: Config, labels: Optional[Sequence[int]], seeds: Sequence[int], **kwargs: Any
) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
    """``sample_images`` shared by the processes of the default process group (torchrun; see
    ``ditkit.train.distributed.setup_sampling``); every rank must call it with the same arguments.

    Rank ``r`` of ``W`` draws the contiguous share ``[r N / W, (r + 1) N / W)`` of the ``N`` seeds
    (and labels); rank 0 gathers the shares in order and returns all ``N`` images: the ones one
    process draws with the same seeds, since each sample depends only on its own seed and label
    (up to float rounding in batches of another composition). The other ranks get their own share.
    """
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    lo, hi = rank * len(seeds) // world_size, (rank + 1) * len(seeds) // world_size
    share = None
    if hi > lo:
        share = sample_images(model, cfg, None if labels is None else list(labels)[lo:hi], list(seeds)[lo:hi], **kwargs)
    shares: Optional[list[Any]] = [None] * world_size if rank == 0 else None
    dist.gather_object(share, shares, dst=0)
    if rank != 0:
        return share if share is not None else (torch.empty(0), None, [])
    parts = [p for p in shares or [] if p is not None]
    trajectory = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
    return torch.cat([p[0] for p in parts]), trajectory, parts[0][2]


@dataclass
class GenerateResult:
    """images: (N, C, H, W) float32 in [-1, 1]; labels: per sample or None; seeds: per sample;
    trajectory: (N, K, C, H, W) x0 predictions at ``trajectory_steps`` or None; metadata: strings
    that identify the run (also written into every PNG)."""

    images: torch.Tensor
    labels: Optional[list[int]]
    seeds: list[int]
    metadata: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    trajectory: Optional[torch.Tensor] = None
    trajectory_steps: list[int] = field(default_factory=list)
    is_latent: bool = False  # images are undecoded VAE latents (a latent model sampled without a VAE)

    def sample_metadata(self, index: int) -> dict[str, str]:
        """Metadata of sample ``index``: the shared entries plus its seed and label."""
        meta = dict(self.metadata)
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


def generate(
    ckpt: str | Path,
    *,
    class_labels: Optional[Sequence[int]] = None,
    num_samples: Optional[int] = None,
    sampler: Optional[str] = None,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    guide_channels: Optional[int] = None,
    ddim_eta: Optional[float] = None,
    seed: Optional[int] = None,
    batch_size: int = 64,
    use_ema: bool = True,
    trajectory_points: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    progress: Optional[Callable[[int], None]] = None,
    timestep_spacing: Optional[str] = None,
    vae: Optional[str | Path] = None,
    distributed: bool = False,
) -> GenerateResult:
    """Sample from a checkpoint (a ``step_*`` directory, or a run directory: its newest checkpoint).

    Options left None come from the checkpoint's ``sample`` config section. Sample ``i`` uses seed
    ``seed + i``. Returns images in [-1, 1] with metadata (model, checkpoint and its SHA-256,
    step, weights, sampler, steps, cfg scale, seeds, labels). A latent model decodes through
    ``vae`` (a local AutoencoderKL folder; default: the one its config records); with none, the
    result holds the latents (``result.is_latent``). ``distributed``: the ranks of the process
    group share the seeds and rank 0 gets every image (``sample_images_distributed``).
    """
    # Every check before any work: checkpoint, labels, sampler options, device (then the load).
    ckpt_dir = resolve_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt_dir)
    resolve_labels(cfg.data.num_classes or 0, class_labels, num_samples)
    check_sampling_options(cfg, sampler, num_sampling_steps, cfg_scale)
    generator = ImageGenerator.from_checkpoint(ckpt_dir, use_ema=use_ema, device=device, precision=precision, vae=vae)
    return generator.generate(
        class_labels=class_labels, num_samples=num_samples, sampler=sampler, num_sampling_steps=num_sampling_steps,
        cfg_scale=cfg_scale, guide_channels=guide_channels, ddim_eta=ddim_eta, seed=seed, batch_size=batch_size,
        trajectory_points=trajectory_points, progress=progress, timestep_spacing=timestep_spacing,
        distributed=distributed,
    )


class ImageGenerator:
    """A checkpoint loaded once (model on its device, config, identity), sampled many times.

    ``generate(...)`` draws images exactly as the function ``generate(ckpt, ...)`` does (which is
    ``ImageGenerator.from_checkpoint(ckpt).generate(...)``), without reloading the weights. One
    caller at a time: the model is shared, so a server gives each generator one worker thread.
    """

    def __init__(
        self,
        model: DiT,
        cfg: Config,
        ckpt_dir: str | Path,
        *,
        use_ema: bool = True,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae: Optional[Any] = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = vae  # a LatentVAE decoding a latent model's samples, or None
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.ckpt_dir = Path(ckpt_dir)
        self.weights = "ema" if use_ema else "model"
        self.step = checkpoint_facts(self.ckpt_dir)["step"]
        self.checkpoint_sha256 = weights_sha256(self.ckpt_dir, self.weights)
        self.class_names = _class_names(cfg)

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | Path, *, use_ema: bool = True, device: str = "auto", precision: str = "fp32",
        vae: Optional[str | Path] = None,
    ) -> "ImageGenerator":
        """Load a checkpoint (a ``step_*`` directory, or a run directory: its newest checkpoint);
        for a latent model also its VAE (``vae``, else the folder its config records, if any)."""
        ckpt_dir = resolve_checkpoint(ckpt)
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        model, cfg, ckpt_dir = load_model(ckpt_dir, use_ema=use_ema)
        return cls(model, cfg, ckpt_dir, use_ema=use_ema, device=dev, dtype=dtype, vae=load_decoder(cfg, vae, dev))

    @property
    def num_classes(self) -> int:
        """Number of real classes (0: unconditional model)."""
        return self.cfg.data.num_classes or 0

    def generate(
        self,
        *,
        class_labels: Optional[Sequence[int]] = None,
        num_samples: Optional[int] = None,
        sampler: Optional[str] = None,
        num_sampling_steps: Optional[int] = None,
        cfg_scale: Optional[float] = None,
        guide_channels: Optional[int] = None,
        ddim_eta: Optional[float] = None,
        seed: Optional[int] = None,
        batch_size: int = 64,
        trajectory_points: int = 0,
        progress: Optional[Callable[[int], None]] = None,
        timestep_spacing: Optional[str] = None,
        distributed: bool = False,
    ) -> GenerateResult:
        """Draw images; options left None come from the checkpoint's ``sample`` section and sample
        ``i`` uses seed ``seed + i`` (see ``generate``). ``progress(1)`` is called once per sampler
        step and batch; an exception raised there aborts the call. ``distributed``: every rank of
        the process group calls this and draws a share (``sample_images_distributed``); rank 0's
        result holds all the images."""
        cfg = self.cfg
        labels, n = resolve_labels(self.num_classes, class_labels, num_samples)
        sampler, steps, cfg_scale = check_sampling_options(cfg, sampler, num_sampling_steps, cfg_scale)
        seed = cfg.sample.seed if seed is None else seed
        seeds = [seed + i for i in range(n)]
        draw = sample_images_distributed if distributed else sample_images
        images, trajectory, traj_idx = draw(
            self.model, cfg, labels, seeds, sampler=sampler, num_sampling_steps=steps, cfg_scale=cfg_scale,
            guide_channels=guide_channels, ddim_eta=ddim_eta, batch_size=batch_size, device=self.device,
            dtype=self.dtype, trajectory_points=trajectory_points, progress=progress,
            timestep_spacing=timestep_spacing, vae=self.vae,
        )
        is_latent = bool(cfg.data.latent_channels) and self.vae is None
        metadata = {
            "software": f"ditkit {ditkit.__version__}",
            "model": cfg.model.name,
            "checkpoint": str(self.ckpt_dir),
            "checkpoint_sha256": self.checkpoint_sha256,
            "step": str(self.step),
            "weights": self.weights,
            "dataset": cfg.data.dataset,
            "objective": f"{cfg.objective.kind}" + (f"/{cfg.objective.prediction}" if cfg.objective.kind == "gaussian" else ""),
            "sampler": sampler,
            "num_sampling_steps": str(steps),
            "cfg_scale": str(cfg_scale),
            "seed": str(seed),
            "precision": str(self.dtype).removeprefix("torch."),
        }
        if cfg.objective.kind == "gaussian":
            metadata["timestep_spacing"] = resolve_timestep_spacing(cfg, sampler, timestep_spacing)
        if cfg.data.latent_channels:
            metadata["output"] = "latents (no VAE to decode)" if is_latent else "decoded latents"
            if self.vae is not None:
                metadata["vae"] = str(self.vae.path)
        if labels is not None:
            metadata["labels"] = " ".join(map(str, labels))
        result = GenerateResult(images, labels, seeds, metadata, list(self.class_names), trajectory, traj_idx)
        result.is_latent = is_latent
        return result


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


def _class_names(cfg: Config) -> list[str]:
    from ditkit.data.builtin import SHAPE_CLASSES  # names are cheap to know, data is not loaded

    if cfg.data.dataset == "shapes":
        return list(SHAPE_CLASSES)
    return [str(i) for i in range(cfg.data.num_classes or 0)]


# ---- images --------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 (the ADM ``arr_0`` layout)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (H', W', C) uint8 picture, ``nrow`` images per row (default
    ~sqrt(N)), ``padding`` pixels of black between them, each image enlarged ``scale`` times
    (nearest neighbour, so tiny images stay sharp)."""
    pixels = to_uint8(images)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def display_scale(image_size: int, target: int = 64) -> int:
    """Integer enlargement that shows an ``image_size`` picture at least ``target`` pixels wide."""
    return max(1, math.ceil(target / image_size))


def save_png(pixels: np.ndarray, path: str | Path | IO[bytes], metadata: Optional[dict[str, str]] = None) -> None:
    """Save (H, W, C) uint8 (C = 1 or 3) as PNG with ``metadata`` as tEXt chunks (``path`` may
    also be a binary file object, e.g. ``io.BytesIO``)."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    array = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    Image.fromarray(array).save(path, format="PNG", pnginfo=info)

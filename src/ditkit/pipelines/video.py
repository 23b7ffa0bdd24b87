"""Clips from a class-conditional (or unconditional) video DiT (Latte).

    pipe = ditkit.load("results/moving_digits")
    out = pipe(class_labels=["3 up"], num_frames=16, num_inference_steps=25, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0))
    out.tensors        # (N, C, F, H, W) float32 in [-1, 1]
    out.frames[0][5]   # PIL image: frame 5 of clip 0
    out.save("threes") # 000000.gif + 000000.mp4 per clip, contact_sheet.png, metadata.json

The network draws a whole clip ``(N, C, F, H, W)`` at once; ``num_frames`` may differ from the
length it trained on (Latte computes its position tables per call, so 16 frames from a model
trained on 8 run; positions past the trained range are extrapolated). The objective and sampler
are the image ones (``Objective.sample``, any ``SAMPLERS`` entry of the objective's family,
classifier-free guidance from ``ditkit.samplers.guidance``): one place for the noise maths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ditkit.builders.dit import model_input_shape
from ditkit.config import DEFAULT_NUM_FRAMES, ConfigError
from ditkit.data.video import clip_to_frames, save_contact_sheet, save_gif, save_mp4, tile_clips
from ditkit.fileio import write_text
from ditkit.media import display_scale, heat_rgb, save_png, to_pil
from ditkit.pipelines.base import GeneratorArg
from ditkit.pipelines.denoising import DenoisingPipeline, LatentDecoding, SamplingPlan, TrajectoryRecorder
from ditkit.progress import announce_total, sampling_progress
from ditkit.registry import PIPELINES

__all__ = ["VideoPipeline", "VideoPipelineOutput", "DEFAULT_FPS"]

DEFAULT_FPS = 8.0  # frames per second of the written GIFs and MP4s (moving_digits moves S/16 px a frame)


@dataclass
class VideoPipelineOutput:
    """What a video pipeline returns.

    tensors: ``(N, C, F, H, W)`` float32 in [-1, 1] on the CPU; frames: N lists of F PIL images
    (``L`` or ``RGB``, diffusers' ``frames``); labels / seeds per clip (seeds None when the caller
    passed generators); metadata: entries that identify the run and the sampling (also written
    into ``metadata.json`` and the contact sheet); fps: playback rate of ``save``; trajectory /
    trajectory_xt: ``(N, K, C, F, H, W)`` the predicted clean clips and the noisy states at sampler
    steps ``trajectory_steps`` (``trajectory_points=K``), or None; prompts / negative_prompts: one
    per clip from a text-to-video model (labels None), else empty; attention_maps: per clip a list of
    ``(word, heat (F, H, W) in [0, 1])`` (``attention_maps=True`` of a text-to-video model), or None."""

    tensors: torch.Tensor
    frames: list[list[Image.Image]]
    labels: Optional[list[int]]
    seeds: Optional[list[int]]
    metadata: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    fps: float = DEFAULT_FPS
    trajectory: Optional[torch.Tensor] = None
    trajectory_xt: Optional[torch.Tensor] = None
    trajectory_steps: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    attention_maps: Optional[list[list[tuple[str, torch.Tensor]]]] = None

    @property
    def num_frames(self) -> int:
        return self.tensors.shape[2]

    def sample_metadata(self, index: int) -> dict[str, str]:
        """Metadata of clip ``index``: the shared entries plus its seed and label (or prompt)."""
        meta = dict(self.metadata)
        if self.seeds is not None:
            meta["seed"] = str(self.seeds[index])
        meta["sample_index"] = str(index)
        if self.prompts:
            meta["prompt"] = self.prompts[index]
            meta["negative_prompt"] = self.negative_prompts[index] if self.negative_prompts else ""
        elif self.labels is not None:
            label = self.labels[index]
            meta["label"] = str(label)
            if label < len(self.class_names):
                meta["class_name"] = self.class_names[label]
        else:
            meta["label"] = "none (unconditional)"
        return meta

    def gif_bytes(self, index: int, scale: Optional[int] = None) -> bytes:
        """Clip ``index`` as a looping GIF file at ``fps`` (in memory), ``scale`` times larger
        (default: at least 64 px wide)."""
        import io

        scale = scale or display_scale(self.tensors.shape[-1])
        frames = clip_to_frames(self.tensors[index], scale)  # (F, H', W', C) uint8
        pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
        buffer = io.BytesIO()
        pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / self.fps),
                         loop=0)
        return buffer.getvalue()

    def contact_sheet(self, index: int, scale: Optional[int] = None) -> Any:
        """Clip ``index``'s frames in a row, 2 px of mid-gray apart: ``(H', W', C)`` uint8."""
        scale = scale or display_scale(self.tensors.shape[-1])
        clip = self.tensors[index]  # (C, F, H, W) -> F one-frame clips in a row
        return clip_to_frames(tile_clips(clip.transpose(0, 1)[:, :, None], nrow=clip.shape[1], pad_value=0.5), scale)[0]

    def attention_sheet(self, index: int, scale: Optional[int] = None) -> Any:
        """``(H', W', 3)`` uint8: clip ``index``'s frames in a row, then one row per prompt word of its
        cross-attention heat per frame (red attended, blue not), the word at the left of its row."""
        if self.attention_maps is None:
            raise ValueError("no attention maps: sample with attention_maps=True")
        scale = scale or display_scale(self.tensors.shape[-1])
        clip = (self.tensors[index].clamp(-1, 1) + 1) / 2  # (C, F, H, W) in [0, 1]
        rows = [clip.expand(3, -1, -1, -1).permute(1, 2, 3, 0)]  # (F, H, W, 3)
        words = [""]
        for word, heat in self.attention_maps[index]:
            rows.append(heat_rgb(heat))
            words.append(word)
        frames, size = clip.shape[1], clip.shape[-1] * scale
        margin = 8 + 6 * max(len(w) for w in words)
        sheet = Image.new("RGB", (margin + frames * (size + 2), len(rows) * (size + 2)), (0, 0, 0))
        draw = ImageDraw.Draw(sheet)
        for r, (row, word) in enumerate(zip(rows, words)):
            for f in range(frames):
                tile = Image.fromarray((row[f].clamp(0, 1) * 255).byte().numpy())
                sheet.paste(tile.resize((size, size), Image.Resampling.NEAREST), (margin + f * (size + 2), r * (size + 2)))
            draw.text((2, r * (size + 2) + size // 2 - 5), word, fill=(255, 255, 255), font=ImageFont.load_default())
        return np.asarray(sheet)

    def save(self, out_dir: str | Path, *, fps: Optional[float] = None, scale: Optional[int] = None,
             mp4: bool = True) -> list[Path]:
        """Write ``NNNNNN.gif`` (looping) and ``NNNNNN.mp4`` (H.264, yuv420p) per clip,
        ``contact_sheet.png`` (one row of frames per clip, metadata in tEXt chunks),
        ``metadata.json``, with a trajectory ``NNNNNN_trajectory.png`` per clip (first 8): for each
        recorded step a row of the predicted clean frames, then a row of the noisy state, and with
        attention maps ``NNNNNN_attention.png`` per clip (``attention_sheet``). ``scale``: integer
        enlargement (default: at least 64 px wide). Each
        file is written whole or not at all. Returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fps = self.fps if fps is None else float(fps)
        if fps <= 0:
            raise ConfigError(f"--fps {fps:g}: use a positive frame rate, e.g. 8")
        scale = scale or display_scale(self.tensors.shape[-1])
        written: list[Path] = []
        for i, clip in enumerate(self.tensors):
            written.append(save_gif(clip, out / f"{i:06d}.gif", fps=fps, scale=scale))
            if mp4:
                written.append(save_mp4(clip, out / f"{i:06d}.mp4", fps=fps, scale=scale))
        layout = "one row per clip, frames left to right"
        written.append(save_contact_sheet(self.tensors, out / "contact_sheet.png", scale=scale,
                                          metadata={**self.metadata, "layout": layout}))
        if self.trajectory is not None and self.trajectory_xt is not None:
            steps = " ".join(map(str, self.trajectory_steps))
            for i in range(min(8, len(self.trajectory))):  # (K, C, F, H, W) twice -> rows x0, x_t, x0, ...
                rows = torch.stack([self.trajectory[i], self.trajectory_xt[i]], 1).flatten(0, 1)
                written.append(save_contact_sheet(rows, out / f"{i:06d}_trajectory.png", scale=scale, metadata={
                    **self.sample_metadata(i), "trajectory_steps": steps,
                    "layout": "per step: a row of predicted clean frames (x0), then a row of the noisy state (x_t)"}))
        for i in range(len(self.tensors) if self.attention_maps is not None else 0):
            path = out / f"{i:06d}_attention.png"
            save_png(self.attention_sheet(i, scale), path, {  # whole or not at all, as the other files
                **self.sample_metadata(i),
                "layout": "the clip's frames, then per prompt word its cross-attention map in each frame (DAAM)"})
            written.append(path)
        meta = {"shared": {**self.metadata, "fps": f"{fps:g}"},
                "samples": [self.sample_metadata(i) for i in range(len(self.tensors))]}
        write_text(out / "metadata.json", json.dumps(meta, indent=1))
        return written + [out / "metadata.json"]


@PIPELINES.register("video")
class VideoPipeline(LatentDecoding, DenoisingPipeline):
    """Class-conditional / unconditional video DiT over pixel clips (see the module docstring)."""

    modality = "video"

    def decode_clips(self, z: torch.Tensor) -> torch.Tensor:
        """Latent clips (N, c, F, h, w) -> pixel clips (N, C, F, H, W) in [-1, 1], frame by frame
        through the VAE (as they were encoded for training)."""
        N, c, F_, h, w = z.shape
        frames = self.vae.decode_to(z.transpose(1, 2).reshape(N * F_, c, h, w), self.cfg.data.channels)
        return frames.view(N, F_, *frames.shape[1:]).transpose(1, 2).clamp(-1, 1)

    @property
    def trained_frames(self) -> int:
        """The clip length the model trained on (``data.num_frames``, default 8)."""
        return self.cfg.data.num_frames or DEFAULT_NUM_FRAMES

    def check_num_frames(self, num_frames: Optional[int]) -> int:
        """``num_frames`` (default: the trained length), checked: at least 2 (1 for a single-frame
        model) and a multiple of the model's tubelet size; ``ConfigError`` says what to use."""
        frames = self.trained_frames if num_frames is None else int(num_frames)
        tubelet = int(getattr(self.model, "tubelet_size", 1))
        if frames < max(2, tubelet) or frames % tubelet:
            hint = f"a multiple of {tubelet} (the model's tubelet size)" if tubelet > 1 else "2 or more"
            raise ConfigError(f"--num-frames {frames}: use {hint}; this model trained on {self.trained_frames}")
        return frames

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Sequence[int | str]] = None,
        num_frames: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: GeneratorArg = None,
        *,
        num_samples: Optional[int] = None,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        timestep_spacing: Optional[str] = None,
        batch_size: int = 16,
        fps: float = DEFAULT_FPS,
        progress: Optional[Callable[[int], None]] = None,
        allow_untrained_uncond: bool = False,
        trajectory_points: int = 0,
    ) -> VideoPipelineOutput:
        """Draw clips.

        ``class_labels``: ints or class names (``"3 up"``), repeated to ``num_samples`` (default:
        one clip per label; the classes in turn, 16 clips, when none are given). ``num_frames``:
        frames per clip (default the trained length; other lengths run, see the module docstring).
        ``num_inference_steps``, ``guidance_scale`` (1 = none), ``sampler``, ``eta`` and
        ``timestep_spacing`` default to the checkpoint's ``sample`` section. ``generator``: one
        ``torch.Generator`` or one per clip; without it clip ``i`` uses seed ``seed + i``.
        ``progress(k)`` is called once per network step and batch with ``k = num_frames`` (a bar
        over frames x steps). ``fps``: playback rate recorded for ``save``. ``trajectory_points`` > 0:
        also return the predicted clean clips and noisy states at that many steps spread evenly over
        the run (``trajectory_indices``, as images and audio).

        Raises ``ConfigError`` for labels outside the classes, a frame count the model cannot
        take, a sampler that does not fit the objective, bad steps / scales / batch sizes, and
        guidance on a model whose unconditional branch was never trained (unless
        ``allow_untrained_uncond``: a warning).
        """
        frames = self.check_num_frames(num_frames)
        if fps <= 0:
            raise ConfigError(f"--fps {fps:g}: use a positive frame rate, e.g. 8")
        plan = self.plan(class_labels, num_samples, sampler=sampler, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, timestep_spacing=timestep_spacing, eta=eta, seed=seed,
                         generator=generator, batch_size=batch_size, allow_untrained_uncond=allow_untrained_uncond,
                         trajectory_points=trajectory_points)
        return self.draw_clips(plan, frames, fps=fps, batch_size=batch_size, progress=progress)

    def draw_clips(
        self, plan: SamplingPlan, frames: int, *, fps: float, batch_size: int, progress: Optional[Callable[[int], None]],
        conditions: Optional[tuple[Any, Any]] = None, hooks: Sequence[Any] = (),
    ) -> VideoPipelineOutput:
        """Draw the clips of a checked ``plan`` (``plan.labels``, or ``conditions`` = (prompts,
        null prompts) encoded for a prompt model; ``hooks``: ``BatchHook``s; see ``sample_batches``): ``(n, C, frames, S, S)``
        float32 clips in [-1, 1] with their frames, metadata and trajectory. Progress counts
        frames x steps."""
        d = self.cfg.data
        if d.latent_channels and self.vae is None:
            raise ConfigError("this latent video model needs its VAE to decode frames and the checkpoint records none: "
                              "pass --vae PATH (vae=PATH in ditkit.load)")
        announce_total(progress, frames * plan.steps * math.ceil(plan.n / batch_size))  # a bar over frames x steps
        pixels = not d.latent_channels  # latents are recorded unclamped and decoded below
        recorder = TrajectoryRecorder(plan.trajectory_steps, clamp_xt=pixels, clamp_x0=pixels)
        channels, size = model_input_shape(self.cfg)  # pixels, or per-frame latents
        channels = channels or 1
        clips = self.sample_batches(plan.labels, plan.generators, plan.n, (channels, frames, size, size),
                                    guide_channels=channels, callback=recorder.callback(progress, frames),
                                    batch_size=batch_size, conditions=conditions, hooks=list(hooks), **plan.sampling,
                                    finish=self.decode_clips if d.latent_channels else None)
        metadata = self.sampling_metadata(plan)
        metadata.update({"num_frames": str(frames), "trained_frames": str(self.trained_frames)})
        if self.vae is not None:
            metadata["vae"] = str(self.vae.path)
        # (N, K, C, F, H, W); latent clips through the VAE, as the samples
        trajectory, trajectory_xt = recorder.stack(self.decode_clips if d.latent_channels else None)
        if trajectory is not None:
            metadata["trajectory_steps"] = " ".join(map(str, plan.trajectory_steps))
        pil = [to_pil(clip.transpose(0, 1)) for clip in clips]  # (C, F, H, W) -> F images
        return VideoPipelineOutput(clips, pil, plan.labels, plan.seeds, metadata, list(self.class_names), float(fps),
                                   trajectory, trajectory_xt, plan.trajectory_steps)

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        super().add_cli_arguments(parser)  # --lora
        parser.add_argument("--num-frames", type=int, help="video: frames per clip (default: the length it trained on)")
        parser.add_argument("--fps", type=float, help="video: frames per second of the GIFs and MP4s (default 8)")
        parser.add_argument("--vae", metavar="DIR",
                            help="latent models: AutoencoderKL folder to decode with (default: the recorded one)")
        parser.add_argument("--ddim-eta", type=float, help="samplers that take eta (DDIM)")
        parser.add_argument("--timestep-spacing", choices=["uniform", "quadratic"],
                            help="gaussian samplers (default: the checkpoint's)")
        cls.add_trajectory_arguments(parser)

    @classmethod
    def cli_extras(cls, args: Any) -> dict[str, Any]:
        return {**super().cli_extras(args), **({"vae": args.vae} if getattr(args, "vae", None) is not None else {})}

    def cli_call(self, args: Any, distributed: bool = False) -> VideoPipelineOutput:
        with sampling_progress("sampling (frames x steps)") as progress:
            return self(
                class_labels=args.class_labels, num_samples=args.num_samples, num_frames=args.num_frames, sampler=args.sampler,
                num_inference_steps=args.num_sampling_steps, guidance_scale=args.cfg_scale, eta=args.ddim_eta,
                timestep_spacing=args.timestep_spacing, seed=args.seed,
                batch_size=min(args.batch_size, 16),  # a clip is F images: 64 clips of 16 frames would be 1,024 images a call
                fps=args.fps or DEFAULT_FPS, allow_untrained_uncond=args.allow_untrained_uncond, progress=progress,
                trajectory_points=self.trajectory_points_of(args),
            )

    def cli_summary(self, output: VideoPipelineOutput) -> str:
        meta = output.metadata
        return (f"{len(output.tensors)} clips of {output.num_frames} frames ({meta['sampler']}, "
                f"{meta['num_sampling_steps']} steps, cfg {meta['cfg_scale']}) from {meta['checkpoint']}")

    def write_training_samples(self, path_stem: Path) -> Path:
        """``path_stem.gif``: ``sample.num_samples`` clips in a grid (labels cycling over the
        classes, fixed seeds, so grids of successive steps compare); leaves the caller's RNGs as
        they were."""
        cfg = self.cfg
        n, k = cfg.sample.num_samples, self.num_classes
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = self(num_samples=n, allow_untrained_uncond=True) if k == 0 else self(
                class_labels=[i % k for i in range(n)], num_samples=n, allow_untrained_uncond=True
            )
        path = path_stem.with_suffix(".gif")
        nrow = k if k and k <= 8 and n % k == 0 else None
        grid = tile_clips(out.tensors, nrow=nrow)
        return save_gif(grid, path, fps=out.fps, scale=display_scale(cfg.data.image_size))

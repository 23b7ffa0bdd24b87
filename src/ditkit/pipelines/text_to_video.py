"""Clips from prompts: a text-to-video model (``T2V-Latte-*``: Latte with cross-attention to a
prompt, ``models/prompt_dit.py``).

    pipe = ditkit.load("results/moving_digits_captions")
    out = pipe("a 3 moving up", num_frames=8, num_inference_steps=25, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), num_videos_per_prompt=2)
    out.tensors        # (2, 1, 8, 32, 32) float32 in [-1, 1]: (N, C, F, H, W)
    out.prompts[0]     # "a 3 moving up"
    out.save("threes") # GIF + MP4 per clip, contact_sheet.png, metadata.json (prompt per clip)

The prompt side (tokenizer or frozen encoder, the negative prompt, guidance against the empty
caption that caption dropout trained) is the text-to-image pipeline's (``PromptConditioning``);
the clip side (frame count, files, trajectory) is the video pipeline's. Registered as
``text_to_video``; the ``prompt_latte`` model family's ``pipeline`` meta selects it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ditkit.config import ConfigError
from ditkit.data.video import tile_clips, training_prompts
from ditkit.media import display_scale
from ditkit.pipelines.base import GeneratorArg
from ditkit.pipelines.prompt import AttentionMaps, PromptConditioning
from ditkit.pipelines.video import DEFAULT_FPS, VideoPipeline, VideoPipelineOutput
from ditkit.progress import sampling_progress
from ditkit.registry import PIPELINES

__all__ = ["TextToVideoPipeline"]


@PIPELINES.register("text_to_video")
class TextToVideoPipeline(PromptConditioning, VideoPipeline):
    """Text-to-video Latte: prompts in, clips out (see the module docstring)."""

    modality = "text_to_video"
    supports_distributed = False

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | Sequence[str],
        num_frames: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: GeneratorArg = None,
        *,
        negative_prompt: Optional[str | Sequence[str]] = None,
        num_videos_per_prompt: int = 1,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        timestep_spacing: Optional[str] = None,
        batch_size: int = 16,
        fps: float = DEFAULT_FPS,
        strict: bool = False,
        allow_untrained_uncond: bool = False,
        progress: Optional[Callable[[int], None]] = None,
        trajectory_points: int = 0,
        attention_maps: bool = False,
    ) -> VideoPipelineOutput:
        """Draw ``num_videos_per_prompt`` clips per prompt (prompt-major order).

        ``prompt``: a string or a list; ``negative_prompt`` replaces the empty caption as the
        guidance reference (one string, or one per prompt). ``num_frames`` (default the trained
        length), ``num_inference_steps``, ``guidance_scale`` (1 = none), ``sampler``, ``eta``,
        ``timestep_spacing``, ``generator`` / ``seed``, ``fps``, ``progress`` and
        ``trajectory_points`` as ``VideoPipeline.__call__``; ``strict`` refuses prompts over the token
        limit instead of truncating them; ``attention_maps``: per clip and prompt word its
        cross-attention heat in every frame (DAAM; ``out.attention_maps``, ``NNNNNN_attention.png``).
        Returns a ``VideoPipelineOutput`` with ``prompts`` (one per clip) and ``labels`` None. Raises ``ConfigError`` for empty prompts and bad options, and
        guidance on a model trained without caption dropout (unless ``allow_untrained_uncond``).
        """
        frames = self.check_num_frames(num_frames)
        if fps <= 0:
            raise ConfigError(f"--fps {fps:g}: use a positive frame rate, e.g. 8")
        _, expanded, expanded_neg = self.prompt_lists(prompt, negative_prompt, num_videos_per_prompt, what="videos")
        plan = self.plan(sampler=sampler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         timestep_spacing=timestep_spacing, eta=eta, seed=seed, generator=generator, batch_size=batch_size,
                         allow_untrained_uncond=allow_untrained_uncond, trajectory_points=trajectory_points,
                         count=len(expanded))
        conditions = self.encode_prompt_pair(expanded, expanded_neg, strict)
        tubelet = int(getattr(self.model.dit, "tubelet_size", 1))  # the model sees frames / tubelet token frames
        recorder = AttentionMaps(self.model.cross_attention_modules(), (frames // tubelet,)) if attention_maps else None
        out = self.draw_clips(plan, frames, fps=fps, batch_size=batch_size, progress=progress, conditions=conditions,
                              hooks=[recorder] if recorder is not None else [])
        out.prompts, out.negative_prompts = expanded, expanded_neg
        if recorder is not None:
            out.attention_maps = self.word_attention_maps(recorder, expanded, out.tensors.shape[-1], frames=frames)
        return out

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        cls.add_prompt_arguments(parser)
        super().add_cli_arguments(parser)  # the video flags
        parser.add_argument("--num-videos-per-prompt", type=int, help="text-to-video: clips per prompt (default 4)")

    def cli_call(self, args: Any, distributed: bool = False) -> VideoPipelineOutput:
        prompts = self.cli_prompts(args)
        with sampling_progress("sampling (frames x steps)") as progress:
            return self(
                prompts, num_frames=args.num_frames, num_inference_steps=args.num_sampling_steps,
                guidance_scale=args.cfg_scale, negative_prompt=args.negative_prompt,
                num_videos_per_prompt=args.num_videos_per_prompt or 4, seed=args.seed, sampler=args.sampler,
                eta=args.ddim_eta, timestep_spacing=args.timestep_spacing, batch_size=min(args.batch_size, 16),
                fps=args.fps or DEFAULT_FPS, strict=args.strict, allow_untrained_uncond=args.allow_untrained_uncond,
                progress=progress, trajectory_points=self.trajectory_points_of(args), attention_maps=args.attention_maps,
            )

    def write_training_samples(self, path_stem: Path) -> Path:
        """``path_stem.gif``: clips for four prompts of the training data (``training_prompts``:
        the moving-digits grammar, or a folder's first captions), one row per prompt, fixed seeds;
        leaves the caller's RNGs as they were."""
        from ditkit.data.video import save_gif

        prompts = training_prompts(self.cfg.data)
        k = max(1, self.cfg.sample.num_samples // len(prompts))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = self(prompts, num_videos_per_prompt=k, allow_untrained_uncond=True)
        grid = tile_clips(out.tensors, nrow=k)
        return save_gif(grid, path_stem.with_suffix(".gif"), fps=out.fps, scale=display_scale(self.cfg.data.image_size))

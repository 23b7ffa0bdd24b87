"""Serving video models: a video checkpoint loaded once as a ``VideoPipeline`` (or a
``TextToVideoPipeline``: requests send ``prompt`` instead of class labels) and called per request
(``POST /v1/videos``), answering each clip as a looping GIF and a contact-sheet PNG (base64).

The request checks (labels, steps, guidance, seed, how many clips) are the image adapter's, with
``num_frames`` (the pipeline's own check: a multiple of the tubelet, at least 2; at most
``MAX_FRAMES``) and ``fps`` on top.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ditkit.config import ConfigError
from ditkit.pipelines.video import DEFAULT_FPS, VideoPipeline, VideoPipelineOutput
from ditkit.serve.models import ImageModel, ServeLimits, check_range, png_base64

__all__ = ["VideoModel", "VideoJobSpec", "MAX_FRAMES", "MAX_FPS"]

MAX_FRAMES = 32  # frames per clip a request may ask for (a clip costs frames x steps network rows)
MAX_FPS = 60.0
BATCH = 16  # clips per network batch (a clip is F images)


@dataclass
class VideoJobSpec:
    """A checked video request."""

    labels: Optional[list[int]]
    num_samples: int
    num_frames: int
    fps: float
    sampler: str
    steps: int
    cfg_scale: float
    seed: int
    prompt: Optional[str] = None  # text-to-video models: num_samples clips of this prompt
    negative_prompt: Optional[str] = None


class VideoModel(ImageModel):
    """A video checkpoint served by name (labels and sampling options checked as for images)."""

    modality = "video"

    def __init__(self, name: str, pipeline: VideoPipeline) -> None:  # type: ignore[override]
        super().__init__(name, pipeline)  # type: ignore[arg-type]
        self.pipeline: VideoPipeline = pipeline  # type: ignore[assignment]

    def describe(self, limits: ServeLimits) -> dict[str, Any]:
        facts = super().describe(limits)
        defaults = facts["defaults"]
        defaults["num_samples"] = defaults.pop("num_images")
        defaults["num_frames"] = min(self.pipeline.trained_frames, MAX_FRAMES)
        defaults["fps"] = DEFAULT_FPS
        for key in ("loras", "takes_image"):
            facts.pop(key, None)
        facts.update({"modality": "video", "trained_frames": self.pipeline.trained_frames})
        facts["limits"].update({"max_frames": MAX_FRAMES, "max_fps": MAX_FPS})
        return facts

    def check_video(
        self, limits: ServeLimits, *, class_labels: Optional[Sequence[int | str]], num_samples: int,
        num_frames: Optional[int], fps: Optional[float], sampler: Optional[str], steps: Optional[int],
        cfg_scale: Optional[float], seed: Optional[int], prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
    ) -> VideoJobSpec:
        """Check a request; raises ``RequestError`` (422) naming the field and the limit. A
        text-to-video model takes ``prompt`` (and ``negative_prompt``) instead of class labels."""
        from ditkit.serve.models import _unprocessable

        if num_frames is not None:
            check_range("num_frames", num_frames, 1, MAX_FRAMES, "max_frames")
        try:
            frames = self.pipeline.check_num_frames(num_frames)
        except ConfigError as err:
            raise _unprocessable(str(err).replace("--num-frames", "num_frames")) from None
        check_range("num_frames (the model's trained length; send a smaller num_frames)", frames, 1, MAX_FRAMES, "max_frames")
        fps = DEFAULT_FPS if fps is None else fps
        if not 0 < fps <= MAX_FPS:
            raise _unprocessable(f"fps={fps:g}: use a frame rate in (0, {MAX_FPS:g}] (max_fps)")
        spec = self.check(limits, class_labels=class_labels, num_images=num_samples, sampler=sampler, steps=steps,
                          cfg_scale=cfg_scale, seed=seed, prompt=prompt, negative_prompt=negative_prompt)
        return VideoJobSpec(None if self.takes_prompts else spec.labels, spec.num_images, frames, float(fps), spec.sampler,
                            spec.steps, spec.cfg_scale, spec.seed, prompt, negative_prompt)

    def runner(self, spec: Any) -> Callable[[Callable[[int], None]], dict[str, Any]]:
        """The job body: sample and encode the clips (all on the worker thread)."""

        def run(step: Callable[[int], None]) -> dict[str, Any]:
            options = dict(num_frames=spec.num_frames, sampler=spec.sampler, num_inference_steps=spec.steps,
                           guidance_scale=spec.cfg_scale, seed=spec.seed, batch_size=BATCH, fps=spec.fps, progress=step)
            if spec.prompt is not None:  # text-to-video
                result = self.pipeline(spec.prompt, negative_prompt=spec.negative_prompt,  # type: ignore[call-arg]
                                       num_videos_per_prompt=spec.num_samples, **options)
            else:
                result = self.pipeline(class_labels=spec.labels, num_samples=spec.num_samples, **options)
            return self.encode_video(result)

        return run

    def encode_video(self, result: VideoPipelineOutput) -> dict[str, Any]:
        clips = []
        for i, clip in enumerate(result.tensors):
            meta = result.sample_metadata(i)
            meta["fps"] = f"{result.fps:g}"
            label = result.labels[i] if result.labels is not None else None
            clips.append({
                "index": i, "seed": int(meta.get("seed", 0)), "label": label, "class_name": meta.get("class_name"),
                "num_frames": int(clip.shape[1]), "fps": result.fps,
                "gif_base64": base64.b64encode(result.gif_bytes(i)).decode("ascii"),
                "contact_sheet_png_base64": png_base64(result.contact_sheet(i), meta),
                "metadata": meta,
            })
        return {"metadata": result.metadata, "clips": clips}

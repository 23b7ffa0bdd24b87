"""Serving audio models: an audio checkpoint loaded once as an ``AudioPipeline`` and called per
request (``POST /v1/audio``), answering WAV files and spectrogram PNGs as base64.

The request checks (labels, steps, guidance, seed, how many clips) are the image adapter's, with
``duration`` on top: at most the model's ``max_seconds`` and ``MAX_SECONDS``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ditkit.pipelines.audio import AudioPipeline, AudioPipelineOutput, spectrogram_strip
from ditkit.serve.models import BATCH_SIZE, ImageModel, ServeLimits, check_range, png_base64

__all__ = ["AudioModel", "AudioJobSpec", "MAX_SECONDS"]

MAX_SECONDS = 10.0  # longest clip a request may ask for (Griffin-Lim costs ~0.2 s of CPU per second)


@dataclass
class AudioJobSpec:
    """A checked audio request."""

    labels: Optional[list[int]]
    num_samples: int
    duration: float
    sampler: str
    steps: int
    cfg_scale: float
    seed: int


def wav_base64(wave: Any, sample_rate: int) -> str:
    """(S,) float waveform in [-1, 1] -> base64 of a 16-bit PCM WAV file."""
    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class AudioModel(ImageModel):
    """An audio checkpoint served by name (labels and sampling options checked as for images)."""

    modality = "audio"

    def __init__(self, name: str, pipeline: AudioPipeline) -> None:  # type: ignore[override]
        super().__init__(name, pipeline)  # type: ignore[arg-type]
        self.pipeline: AudioPipeline = pipeline  # type: ignore[assignment]

    @property
    def max_seconds(self) -> float:
        return min(self.pipeline.max_seconds, MAX_SECONDS)

    def describe(self, limits: ServeLimits) -> dict[str, Any]:
        facts = super().describe(limits)
        defaults = facts["defaults"]
        defaults["num_samples"] = defaults.pop("num_images")
        defaults["duration"] = min(self.cfg.data.duration, self.max_seconds)
        for key in ("image_size", "channels", "loras", "takes_image"):
            facts.pop(key, None)
        facts.update({"modality": "audio", "sample_rate": self.cfg.data.sample_rate, "n_mels": self.cfg.data.n_mels,
                      "trained_duration": self.cfg.data.duration})
        facts["limits"]["max_seconds"] = self.max_seconds
        return facts

    def check_audio(
        self, limits: ServeLimits, *, class_labels: Optional[Sequence[int | str]], num_samples: int,
        duration: Optional[float], sampler: Optional[str], steps: Optional[int], cfg_scale: Optional[float],
        seed: Optional[int],
    ) -> AudioJobSpec:
        """Check a request; raises ``RequestError`` (422) naming the field and the limit."""
        duration = self.cfg.data.duration if duration is None else duration
        check_range("duration", duration, self.cfg.data.hop_length / self.cfg.data.sample_rate, self.max_seconds,
                    "the model's max_seconds")
        spec = self.check(limits, class_labels=class_labels, num_images=num_samples, sampler=sampler, steps=steps,
                          cfg_scale=cfg_scale, seed=seed)
        return AudioJobSpec(spec.labels, spec.num_images, float(duration), spec.sampler, spec.steps, spec.cfg_scale, spec.seed)

    def runner(self, spec: Any) -> Callable[[Callable[[int], None]], dict[str, Any]]:
        """The job body: sample, vocode and encode (all on the worker thread)."""

        def run(step: Callable[[int], None]) -> dict[str, Any]:
            result = self.pipeline(
                class_labels=spec.labels, num_samples=spec.num_samples, duration=spec.duration, sampler=spec.sampler,
                num_inference_steps=spec.steps, guidance_scale=spec.cfg_scale, seed=spec.seed, batch_size=BATCH_SIZE,
                progress=step,
            )
            return self.encode_audio(result)

        return run

    def encode_audio(self, result: AudioPipelineOutput) -> dict[str, Any]:
        clips = []
        for i, wave in enumerate(result.waveforms):
            meta = result.sample_metadata(i)
            label = result.labels[i] if result.labels is not None else None
            clips.append({
                "index": i, "seed": int(meta.get("seed", 0)), "label": label,
                "class_name": meta.get("class_name"), "sample_rate": result.sample_rate,
                "seconds": round(len(wave) / result.sample_rate, 4),
                "wav_base64": wav_base64(wave, result.sample_rate),
                "spectrogram_png_base64": png_base64(spectrogram_strip(result.logmels[i : i + 1]), meta),
                "metadata": meta,
            })
        return {"metadata": result.metadata, "clips": clips}

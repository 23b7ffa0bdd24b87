"""Sounds from a class-conditional (or unconditional) audio DiT: log-mel spectrograms, then WAV.

    pipe = ditkit.load("results/spoken_digits")
    out = pipe(class_labels=[7], duration=1.0, num_inference_steps=25, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0))
    out.waveforms      # (N, samples) float32 in [-1, 1] at out.sample_rate
    out.save("seven")  # 000000.wav + 000000.png (spectrogram) per sample, spectrograms.png, metadata.json
                       # (+ trajectory.png when called with trajectory_points=N)

The network draws a normalised log-mel ``(N, n_mels, T)`` with ``T = duration x frames per second``
(rounded up to whole patches; the model's position table is computed per length, and its duration
embedding gets the window length, as in training); the objective and sampler are the image ones
(``Objective.sample``, any ``SAMPLERS`` entry of the objective's family, classifier-free guidance
from ``ditkit.samplers.guidance``). The vocoder is librosa's mel inversion + Griffin-Lim
(``ditkit.data.audio.logmel_to_waveform``) with the mel settings the run's config recorded, so a
checkpoint alone plays back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ditkit.builders import default_sampler  # noqa: F401  (re-exported for symmetry with image.py)
from ditkit.config import Config, ConfigError
from ditkit.data.audio import MelSpec, logmel_to_waveform, mel_spec_of, spectrogram_pixels, write_wav
from ditkit.fileio import write_text
from ditkit.media import save_png
from ditkit.pipelines.base import GeneratorArg
from ditkit.pipelines.denoising import DenoisingPipeline, TrajectoryRecorder
from ditkit.progress import announce_total, sampling_progress
from ditkit.registry import PIPELINES

__all__ = ["AudioPipeline", "AudioPipelineOutput", "spectrogram_strip", "trajectory_picture"]

SPECTROGRAM_SCALE = 2  # PNG pixels per spectrogram cell, so a 64 x 64 spectrogram is 128 px tall


def spectrogram_strip(logmels: torch.Tensor, padding: int = 2, scale: int = SPECTROGRAM_SCALE) -> np.ndarray:
    """(N, n_mels, T) normalised log-mels side by side as one (H, W, 1) uint8 picture (low
    frequencies at the bottom, silence black, ``padding`` black columns between clips)."""
    parts = []
    for i, m in enumerate(logmels):
        pix = spectrogram_pixels(m).repeat(scale, axis=0).repeat(scale, axis=1)
        parts.append(pix)
        if i < len(logmels) - 1:
            parts.append(np.zeros((pix.shape[0], padding), np.uint8))
    return np.concatenate(parts, axis=1)[..., None]


def trajectory_picture(x0: torch.Tensor, xt: torch.Tensor, padding: int = 2, scale: int = SPECTROGRAM_SCALE) -> np.ndarray:
    """``x0``, ``xt`` ``(n, K, n_mels, T)`` -> one (H, W, 1) uint8 picture: per sample two rows of
    ``K`` spectrograms (the predicted clean log-mel, then the noisy state clamped to [-1, 1]),
    ``padding`` black pixels between cells. ``H = 2n (n_mels scale) + (2n - 1) padding``,
    ``W = K (T scale) + (K - 1) padding``."""
    rows = []
    for pred, noisy in zip(x0, xt):
        for row in (pred, noisy.clamp(-1, 1)):
            if rows:
                rows.append(np.zeros((padding, rows[0].shape[1], 1), np.uint8))
            rows.append(spectrogram_strip(row, padding, scale))
    return np.concatenate(rows, axis=0)


@dataclass
class AudioPipelineOutput:
    """What an audio pipeline returns.

    waveforms: ``(N, samples)`` float32 in [-1, 1] at ``sample_rate`` Hz, ``samples =
    round(duration x sample_rate)``; logmels: ``(N, n_mels, T)`` float32 normalised log-mels in
    [-1, 1] (what the network drew, before the vocoder); labels / seeds per sample (seeds None when
    the caller passed generators); metadata: entries that identify the run and the sampling (also
    written into every PNG and ``metadata.json``); trajectory / trajectory_xt: ``(N, K, n_mels, T)``
    the predicted clean log-mels and the noisy states at sampler steps ``trajectory_steps``
    (0-based), or None."""

    waveforms: np.ndarray
    sample_rate: int
    logmels: torch.Tensor
    labels: Optional[list[int]]
    seeds: Optional[list[int]]
    metadata: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    trajectory: Optional[torch.Tensor] = None
    trajectory_xt: Optional[torch.Tensor] = None
    trajectory_steps: list[int] = field(default_factory=list)

    @property
    def duration(self) -> float:
        """Seconds per clip."""
        return self.waveforms.shape[1] / self.sample_rate

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

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``NNNNNN.wav`` (16-bit PCM) and ``NNNNNN.png`` (its spectrogram, metadata in tEXt
        chunks) per sample, ``spectrograms.png`` (all side by side) and ``metadata.json`` (the
        metadata of every sample); with a trajectory ``trajectory.png`` (``trajectory_picture`` of
        the first 8 samples). Each file is complete or absent. Returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for i, wave in enumerate(self.waveforms):
            written.append(write_wav(out / f"{i:06d}.wav", wave, self.sample_rate))
            png = out / f"{i:06d}.png"
            save_png(spectrogram_strip(self.logmels[i : i + 1]), png, self.sample_metadata(i))
            written.append(png)
        save_png(spectrogram_strip(self.logmels), out / "spectrograms.png",
                 {**self.metadata, "layout": "one spectrogram per sample, left to right; low frequencies at the bottom"})
        meta = {"shared": self.metadata, "samples": [self.sample_metadata(i) for i in range(len(self.waveforms))]}
        write_text(out / "metadata.json", json.dumps(meta, indent=1))
        written += [out / "spectrograms.png", out / "metadata.json"]
        if self.trajectory is not None and self.trajectory_xt is not None:
            n = min(8, len(self.trajectory))
            save_png(trajectory_picture(self.trajectory[:n], self.trajectory_xt[:n]), out / "trajectory.png",
                     {**self.metadata, "trajectory_steps": " ".join(map(str, self.trajectory_steps)),
                      "layout": "per sample two rows: predicted clean log-mel, then the noisy state; columns: steps; "
                                "low frequencies at the bottom"})
            written.append(out / "trajectory.png")
        return written


@PIPELINES.register("audio")
class AudioPipeline(DenoisingPipeline):
    """Class-conditional / unconditional audio DiT over log-mels, vocoded by Griffin-Lim (see the
    module docstring)."""

    modality = "audio"


    def __init__(self, model: torch.nn.Module, cfg: Config, **kwargs: Any) -> None:
        super().__init__(model, cfg, **kwargs)
        self.spec: MelSpec = mel_spec_of(cfg.data)

    @property
    def max_seconds(self) -> float:
        """The longest clip the model's duration embedding covers (``AudioDiT.max_seconds``)."""
        return float(getattr(self.model, "max_seconds", 30.0))

    def num_frames(self, duration: float) -> int:
        """Spectrogram frames drawn for ``duration`` seconds: rounded up to whole patches."""
        patch = int(getattr(self.model, "patch_size", 1))
        frames = max(1, math.ceil(round(duration * self.spec.sample_rate) / self.spec.hop_length))
        return math.ceil(frames / patch) * patch

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Sequence[int | str]] = None,
        duration: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: GeneratorArg = None,
        *,
        num_samples: Optional[int] = None,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        timestep_spacing: Optional[str] = None,
        batch_size: int = 64,
        griffin_lim_iters: int = 32,
        progress: Optional[Callable[[int], None]] = None,
        allow_untrained_uncond: bool = False,
        trajectory_points: int = 0,
    ) -> AudioPipelineOutput:
        """Draw sounds.

        ``class_labels``: ints or class names (``"seven"``), repeated to ``num_samples`` (default:
        one clip per label; the classes in turn, 16 clips, when none are given). ``duration``:
        seconds per clip (default ``data.duration`` of the run, the length it trained on; longer
        clips are an extrapolation of the position table). ``num_inference_steps``,
        ``guidance_scale`` (1 = none), ``sampler``, ``eta`` and ``timestep_spacing`` default to the
        checkpoint's ``sample`` section. ``generator``: one ``torch.Generator`` or one per sample;
        without it sample ``i`` uses seed ``seed + i`` (Griffin-Lim's random start phase too).
        ``griffin_lim_iters``: vocoder iterations (32: ~0.2 s per second of audio on a CPU core).
        ``progress(1)`` is called once per network step and batch. ``trajectory_points`` > 0: also
        return the predicted clean log-mel and the noisy state at that many sampler steps spread
        evenly over the run (``trajectory_indices``, as images).

        Raises ``ConfigError`` for labels outside the classes, a duration <= 0 or beyond the
        model's ``max_seconds``, a sampler that does not fit the objective, guidance on a model
        whose unconditional branch was never trained (unless ``allow_untrained_uncond``).
        """
        cfg = self.cfg
        duration = cfg.data.duration if duration is None else float(duration)
        if not 0 < duration <= self.max_seconds or duration * self.spec.sample_rate < self.spec.hop_length:
            raise ConfigError(
                f"--duration {duration:g}: use a length in seconds between {self.spec.hop_length / self.spec.sample_rate:g} "
                f"and {self.max_seconds:g} (this model trained on {cfg.data.duration:g} s clips)"
            )
        if griffin_lim_iters < 1:
            raise ConfigError(f"griffin_lim_iters={griffin_lim_iters}: use at least 1 (32 is the default)")
        plan = self.plan(class_labels, num_samples, sampler=sampler, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, timestep_spacing=timestep_spacing, eta=eta, seed=seed,
                         generator=generator, batch_size=batch_size, allow_untrained_uncond=allow_untrained_uncond,
                         trajectory_points=trajectory_points)
        announce_total(progress, plan.steps * math.ceil(plan.n / batch_size))
        recorder = TrajectoryRecorder(plan.trajectory_steps)
        logmels = self._draw(plan.labels, plan.generators, plan.n, self.num_frames(duration), batch_size=batch_size,
                             progress=progress, recorder=recorder, **plan.sampling)
        seeds = plan.seeds
        num_samples_out = int(round(duration * self.spec.sample_rate))
        waves = np.stack([
            logmel_to_waveform(m, self.spec, n_iter=griffin_lim_iters, seed=seeds[i] if seeds is not None else i)[:num_samples_out]
            for i, m in enumerate(logmels)
        ])
        metadata = self.sampling_metadata(plan)
        metadata.update({
            "duration_seconds": f"{duration:g}", "sample_rate": str(self.spec.sample_rate),
            "vocoder": f"librosa mel inversion + Griffin-Lim, {griffin_lim_iters} iterations",
            "mel": json.dumps(self.spec.to_dict()),
        })
        trajectory, trajectory_xt = recorder.stack()  # (N, K, n_mels, T)
        if trajectory is not None:
            metadata["trajectory_steps"] = " ".join(map(str, plan.trajectory_steps))
        return AudioPipelineOutput(waves.astype(np.float32), self.spec.sample_rate, logmels, plan.labels, seeds, metadata,
                                   list(self.class_names), trajectory, trajectory_xt, plan.trajectory_steps)

    def _draw(
        self, labels: Optional[list[int]], generators: Any, n: int, frames: int, *, progress: Optional[Callable[[int], None]],
        recorder: Optional[TrajectoryRecorder] = None, **sampling: Any,
    ) -> torch.Tensor:
        """The sampling loop: ``(n, n_mels, frames)`` float32 log-mels in [-1, 1] on the CPU;
        ``recorder`` keeps the trajectory."""
        callback = (recorder or TrajectoryRecorder(())).callback(progress)
        return self.sample_batches(labels, generators, n, (self.spec.n_mels, frames), guide_channels=self.spec.n_mels,
                                   callback=callback, **sampling)

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        parser.add_argument("--duration", type=float, help="seconds per clip (default: the length the model trained on)")
        parser.add_argument("--griffin-lim-iters", type=int, help="vocoder iterations (default 32)")
        cls.add_trajectory_arguments(parser)  # trajectory.png of spectrograms

    def cli_call(self, args: Any, distributed: bool = False) -> AudioPipelineOutput:
        with sampling_progress() as progress:
            return self(
                class_labels=args.class_labels, num_samples=args.num_samples, duration=args.duration,
                sampler=args.sampler, num_inference_steps=args.num_sampling_steps, guidance_scale=args.cfg_scale,
                eta=getattr(args, "ddim_eta", None), timestep_spacing=getattr(args, "timestep_spacing", None),
                seed=args.seed, batch_size=args.batch_size, griffin_lim_iters=args.griffin_lim_iters or 32,
                allow_untrained_uncond=args.allow_untrained_uncond, progress=progress,
                trajectory_points=self.trajectory_points_of(args),
            )

    def cli_summary(self, output: AudioPipelineOutput) -> str:
        meta = output.metadata
        return (f"{len(output.waveforms)} clips of {output.duration:g} s at {output.sample_rate} Hz ({meta['sampler']}, "
                f"{meta['num_sampling_steps']} steps, cfg {meta['cfg_scale']}) from {meta['checkpoint']}")

    def write_training_samples(self, path_stem: Path, num_wavs: int = 4) -> Path:
        """``path_stem.png``: the spectrograms of ``sample.num_samples`` clips (labels cycling over
        the classes, fixed seeds, so strips of successive steps compare), and the first
        ``num_wavs`` of them as ``path_stem_N.wav``; leaves the caller's RNGs as they were."""
        cfg = self.cfg
        n, k = cfg.sample.num_samples, self.num_classes
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = self(num_samples=n, allow_untrained_uncond=True) if k == 0 else self(
                class_labels=[i % k for i in range(n)], num_samples=n, allow_untrained_uncond=True
            )
        path = path_stem.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(spectrogram_strip(out.logmels), path, {"step": path.stem, "model": cfg.model.name,
                                                         "labels": out.metadata.get("labels", "")})
        for i in range(min(num_wavs, n)):
            write_wav(path.with_name(f"{path.stem}_{i}.wav"), out.waveforms[i], out.sample_rate)
        return path

"""Offline judges of generated audio: spoken-digit recognition, a log-mel digit classifier, duration.

No package ships VGGish/PANN weights, so FAD is not computed here. Instead:

* ``DigitRecognizer``: pocketsphinx 5 (CMU Sphinx; its PyPI wheel ships the US-English acoustic
  model and dictionary) decoding each clip against a JSGF grammar that allows exactly one of the
  ten digit words, so every clip gets a digit (or -1 when the decoder finds no path).
  ``spoken_digit_accuracy`` is the share recognised as the intended digit.
* ``MelClassifier``: a small 1-D CNN over normalised log-mel frames, trained here on the labelled
  real clips (seeded, cached by a hash of data and config). Its accuracy on generated clips, and
  the Frechet distance in its penultimate features (``fd_classifier``; only comparable between runs
  that share the classifier; ``fd_real_floor`` gives real-vs-real for scale).
* ``audible_seconds`` / ``duration_error``: where the sound ends, against the asked duration.

``audio_report`` gathers them into one JSON-ready dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditkit.data.audio import DIGIT_WORDS, MelSpec, waveform_to_logmel
from ditkit.errors import ConfigError
from ditkit.eval.frechet import feature_stats, frechet_distance

__all__ = [
    "DigitRecognizer",
    "spoken_digit_accuracy",
    "MelClassifierConfig",
    "MelCNN",
    "MelClassifier",
    "train_mel_classifier",
    "get_mel_classifier",
    "fd_classifier",
    "audible_seconds",
    "duration_error",
    "audio_report",
    "evaluate_audio",
]


def _as_numpy_waves(waves: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = waves.detach().cpu().float().numpy() if isinstance(waves, torch.Tensor) else np.asarray(waves, np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ConfigError(f"waveforms must be (N, samples), got shape {arr.shape}")
    return arr


# ------------------------------------------------------------------------------------------------
# pocketsphinx with a ten-digit grammar
# ------------------------------------------------------------------------------------------------

DIGIT_GRAMMAR = "#JSGF V1.0;\ngrammar digits;\npublic <digit> = " + " | ".join(DIGIT_WORDS) + " ;\n"


class DigitRecognizer:
    """Which digit word (0..9) each clip says, by pocketsphinx with a one-word ten-digit grammar.

    The acoustic model is 16 kHz; other rates are resampled. Each clip is decoded with `pad_seconds`
    of digital silence before and after it: clips that start at the first sound otherwise leave the
    decoder without a silence path (15% of spoken_digits got no word; 1% with the padding).
    `bestpath=False` (no lattice rescoring) is 1 point better on spoken_digits. One decoder, reused;
    about 15 ms per 1 s clip on one CPU core. Raises ConfigError when pocketsphinx is not installed.
    """

    sample_rate = 16000
    pad_seconds = 0.3

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise ConfigError("spoken-digit accuracy needs pocketsphinx: pip install pocketsphinx") from None
        # lm=None: no n-gram model is loaded; the grammar is the only search.
        self.decoder = Decoder(samprate=self.sample_rate, lm=None, bestpath=False, loglevel="FATAL")
        self.decoder.add_jsgf_string("digits", DIGIT_GRAMMAR)
        self.decoder.activate_search("digits")

    def recognise(self, waves: np.ndarray | torch.Tensor, sample_rate: int) -> list[int]:
        """(N, S) or (S,) float waveforms in [-1, 1] -> N digits (-1 where nothing was decoded)."""
        arr = _as_numpy_waves(waves)
        if sample_rate != self.sample_rate:
            import librosa

            arr = librosa.resample(arr, orig_sr=sample_rate, target_sr=self.sample_rate, axis=-1)
        out = []
        pad = np.zeros(int(self.pad_seconds * self.sample_rate), np.float32)
        for wave in arr:
            wave = np.concatenate([pad, wave, pad])
            pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()  # 16-bit little-endian PCM
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            word = hyp.hypstr.strip() if hyp is not None else ""
            out.append(DIGIT_WORDS.index(word) if word in DIGIT_WORDS else -1)
        return out


def spoken_digit_accuracy(
    waves: np.ndarray | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    sample_rate: int,
    recogniser: Optional[DigitRecognizer] = None,
) -> float:
    """Share of clips (N, S) that pocketsphinx hears as their label digit (N,) in 0..9."""
    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    heard = (recogniser or DigitRecognizer()).recognise(waves, sample_rate)
    if len(heard) != len(labels):
        raise ConfigError(f"{len(heard)} clips but {len(labels)} labels")
    return float(np.mean([h == y for h, y in zip(heard, labels)])) if labels else float("nan")


# ------------------------------------------------------------------------------------------------
# Log-mel digit classifier (features for a Frechet distance)
# ------------------------------------------------------------------------------------------------

ARCHITECTURE = "ditkit-melcnn-v1"  # bump when MelCNN changes: the cache key changes with it


@dataclass(frozen=True)
class MelClassifierConfig:
    """Architecture and training settings of the log-mel classifier (all of it enters the hash)."""

    width: int = 64  # conv channels (a multiple of 8: GroupNorm with 8 groups)
    feature_dim: int = 128  # penultimate width: the feature space of the Frechet distance
    epochs: int = 25
    batch_size: int = 64
    learning_rate: float = 3e-3  # AdamW peak, cosine decay to 0
    weight_decay: float = 1e-3
    max_shift: int = 6  # augmentation: frames of random delay (padding is silence, -1)
    gain_jitter: float = 0.1  # augmentation: random level offset on non-silent bins, normalised units
    mel_shift: int = 2  # augmentation: random shift of the mel axis, bins
    lowpass: bool = True  # augmentation: silence the bins above a random cutoff for half the clips
    holdout_fraction: float = 0.15  # share kept out (whole groups, e.g. voices, when groups are given)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width % 8:
            raise ConfigError(f"mel classifier width {self.width} must be a multiple of 8")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction {self.holdout_fraction} must lie in [0, 1)")


class MelCNN(nn.Module):
    """(B, n_mels, T) in about [-1, 1] -> logits (B, K): three Conv1d-GroupNorm-ReLU stages over
    time (mel bins as channels, 2x pooling between), mean+max pooling over time, Linear-ReLU
    (features, feature_dim) -> Linear."""

    def __init__(self, n_mels: int, num_classes: int, width: int = 64, feature_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        channels = n_mels
        for stage, kernel in enumerate((5, 3, 3)):
            layers += [nn.Conv1d(channels, width, kernel, padding=kernel // 2), nn.GroupNorm(8, width), nn.ReLU()]
            if stage < 2:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(2 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)  # (B, width, T / 4)
        return self.embed(torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=1))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class MelClassifier:
    """A trained MelCNN with its identity (`hash`) and `info` (config, data hash, held-out accuracy)."""

    model: MelCNN
    hash: str
    info: dict[str, Any]

    @torch.no_grad()
    def features_and_logits(self, logmels: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, n_mels, T) normalised log-mels -> features (N, feature_dim), logits (N, K), float32."""
        n_mels = self.info["architecture"]["n_mels"]
        if logmels.ndim != 3 or logmels.shape[1] != n_mels:
            raise ConfigError(f"mel classifier {self.hash} wants (N, {n_mels}, T) log-mels, got {tuple(logmels.shape)}")
        self.model.eval()
        feats, logits = [], []
        for i in range(0, logmels.shape[0], batch_size):
            f = self.model.features(logmels[i : i + batch_size].float())
            feats.append(f)
            logits.append(self.model.head(f))
        return torch.cat(feats), torch.cat(logits)

    def accuracy(self, logmels: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy on (N, n_mels, T) log-mels against labels (N,)."""
        logits = self.features_and_logits(logmels)[1]
        return float((logits.argmax(1) == torch.as_tensor(labels).reshape(-1)).double().mean())


def _augment(x: torch.Tensor, cfg: MelClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of log-mels (B, M, T), silence being -1: a random delay (prepend
    silence, drop the tail), a level offset on non-silent bins, a random shift of the mel axis by up
    to `mel_shift` bins (a cheap vocal-tract-length change) and, for half the clips, a low-pass that
    silences the bins above a random cutoff in the top 40% (telephone audio has nothing above 4 kHz)."""
    B, M, T = x.shape
    out = torch.full_like(x, -1.0)
    shifts = torch.randint(0, cfg.max_shift + 1, (B,), generator=generator).tolist()
    mel_shifts = torch.randint(-cfg.mel_shift, cfg.mel_shift + 1, (B,), generator=generator).tolist()
    for i, (s, m) in enumerate(zip(shifts, mel_shifts)):
        src = x[i, :, : T - s]
        if m > 0:
            out[i, m:, s:] = src[: M - m]
        elif m < 0:
            out[i, : M + m, s:] = src[-m:]
        else:
            out[i, :, s:] = src
    if cfg.lowpass:
        cutoff = (M * (0.6 + 0.4 * torch.rand(B, generator=generator))).long()
        keep = torch.rand(B, generator=generator) < 0.5
        bins = torch.arange(M)[None, :, None]
        out = torch.where((bins >= cutoff[:, None, None]) & ~keep[:, None, None], torch.full_like(out, -1.0), out)
    gain = (torch.rand(B, 1, 1, generator=generator) * 2 - 1) * cfg.gain_jitter
    return torch.where(out > -1.0, out + gain, out)


def _holdout_split(n: int, cfg: MelClassifierConfig, groups: Optional[torch.Tensor], generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    if groups is None:
        k = int(round(cfg.holdout_fraction * n))
        return order[k:], order[:k]
    ids = torch.unique(groups)
    ids = ids[torch.randperm(len(ids), generator=generator)]
    k = int(round(cfg.holdout_fraction * len(ids))) if cfg.holdout_fraction > 0 else 0
    if cfg.holdout_fraction > 0:
        k = max(1, min(k, len(ids) - 1))
    held = torch.isin(groups, ids[:k])
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def train_mel_classifier(
    logmels: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: MelClassifierConfig = MelClassifierConfig(),
    groups: Optional[torch.Tensor] = None,
) -> tuple[MelCNN, Optional[float]]:
    """Train a MelCNN on (N, n_mels, T) log-mels and labels (N,). With `groups` (N,) (e.g. voice
    ids) whole groups are held out, so the accuracy returned is on unseen voices; None when the
    hold-out is empty. Deterministic given config.seed (on one device and thread count)."""
    x_all, y_all = logmels.float().cpu(), torch.as_tensor(labels).to(torch.int64).cpu()
    generator = torch.Generator().manual_seed(config.seed)
    train, holdout = _holdout_split(x_all.shape[0], config, None if groups is None else torch.as_tensor(groups), generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MelCNN(x_all.shape[1], num_classes, config.width, config.feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(config.epochs):
        perm = train[torch.randperm(len(train), generator=generator)]
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i : i + config.batch_size]
            loss = F.cross_entropy(model(_augment(x_all[idx], config, generator)), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    if not len(holdout):
        return model, None
    with torch.no_grad():
        accuracy = float((model(x_all[holdout]).argmax(1) == y_all[holdout]).double().mean())
    return model, accuracy


def _hash_data(logmels: torch.Tensor, labels: torch.Tensor, groups: Optional[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    quantised = ((logmels.float().clamp(-2, 2) + 2) * 60).round().to(torch.uint8).contiguous()  # robust to round-off
    digest.update(json.dumps(list(quantised.shape)).encode())
    digest.update(quantised.numpy().tobytes())
    digest.update(torch.as_tensor(labels).to(torch.int64).numpy().tobytes())
    if groups is not None:
        digest.update(b"groups" + torch.as_tensor(groups).to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def get_mel_classifier(
    logmels: torch.Tensor,
    labels: torch.Tensor,
    cache_dir: str | Path | None = None,
    config: MelClassifierConfig = MelClassifierConfig(),
    num_classes: Optional[int] = None,
    groups: Optional[torch.Tensor] = None,
) -> MelClassifier:
    """The classifier for these log-mels (N, n_mels, T) and labels (N,), loaded from
    `cache_dir/melclassifier-<hash>/` or trained (and saved there, atomically). cache_dir None
    trains without saving. Raises ConfigError for fewer than 2 classes or mismatched shapes."""
    from safetensors.torch import load_file, save_file

    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if logmels.ndim != 3 or labels.shape != (logmels.shape[0],):
        raise ConfigError(f"need log-mels (N, n_mels, T) and labels (N,), got {tuple(logmels.shape)} and {tuple(labels.shape)}")
    num_classes = num_classes or int(labels.max()) + 1
    if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"the mel classifier needs labels in [0, {num_classes}) and at least 2 classes")
    architecture = {"name": ARCHITECTURE, "n_mels": int(logmels.shape[1]), "num_classes": num_classes,
                    "width": config.width, "feature_dim": config.feature_dim}
    key = {"architecture": architecture, "training": dataclasses.asdict(config), "data_hash": _hash_data(logmels, labels, groups)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / f"melclassifier-{digest}" if cache_dir is not None else None

    def build() -> MelCNN:
        return MelCNN(architecture["n_mels"], num_classes, config.width, config.feature_dim)

    if folder is not None and (folder / "classifier.json").is_file():
        model = build()
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return MelClassifier(model.eval(), digest, json.loads((folder / "classifier.json").read_text()))
    model, accuracy = train_mel_classifier(logmels, labels, num_classes, config, groups)
    info = {"hash": digest, **key, "num_clips": int(logmels.shape[0]), "holdout_accuracy": accuracy,
            "holdout": "whole groups" if groups is not None else "random clips"}
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
            (tmp / "classifier.json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "classifier.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return MelClassifier(model, digest, info)


def fd_classifier(classifier: MelClassifier, real: torch.Tensor, generated: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the classifier features of two log-mel sets
    (N, n_mels, T) (each N >= 2). Comparable only between runs that share the classifier."""
    mu1, s1 = feature_stats(classifier.features_and_logits(real)[0])
    mu2, s2 = feature_stats(classifier.features_and_logits(generated)[0])
    return frechet_distance(mu1, s1, mu2, s2)


# ------------------------------------------------------------------------------------------------
# Duration
# ------------------------------------------------------------------------------------------------


def audible_seconds(waves: np.ndarray | torch.Tensor, sample_rate: int, threshold_dbfs: float = -45.0) -> np.ndarray:
    """(N,) seconds from the start to the end of the last 25 ms frame (10 ms hop) whose RMS is above
    `threshold_dbfs`; 0 for a clip that never is. Waves (N, S) in [-1, 1]."""
    arr = _as_numpy_waves(waves).astype(np.float64)
    frame, hop = max(1, int(0.025 * sample_rate)), max(1, int(0.010 * sample_rate))
    if arr.shape[1] < frame:
        arr = np.pad(arr, ((0, 0), (0, frame - arr.shape[1])))
    starts = np.arange(0, arr.shape[1] - frame + 1, hop)
    windows = np.stack([arr[:, s : s + frame] for s in starts], axis=1)  # (N, frames, frame)
    loud = np.sqrt((windows**2).mean(axis=2)) > 10 ** (threshold_dbfs / 20)  # (N, frames)
    last = np.where(loud.any(axis=1), loud.shape[1] - 1 - np.argmax(loud[:, ::-1], axis=1), -1)
    return np.where(last >= 0, (starts[np.maximum(last, 0)] + frame) / sample_rate, 0.0).clip(max=arr.shape[1] / sample_rate)


def duration_error(waves: np.ndarray | torch.Tensor, target_seconds: Sequence[float] | torch.Tensor, sample_rate: int) -> float:
    """Mean |audible seconds - target seconds| over the clips (N, S), in seconds."""
    target = np.asarray(torch.as_tensor(target_seconds, dtype=torch.float64).reshape(-1))
    return float(np.abs(audible_seconds(waves, sample_rate) - target).mean())


# ------------------------------------------------------------------------------------------------
# One report
# ------------------------------------------------------------------------------------------------


def audio_report(
    generated: np.ndarray | torch.Tensor,
    labels: torch.Tensor,
    spec: MelSpec,
    *,
    classifier: Optional[MelClassifier] = None,
    real_logmels: Optional[torch.Tensor] = None,
    target_seconds: Optional[torch.Tensor] = None,
    recogniser: Optional[DigitRecognizer] = None,
    use_pocketsphinx: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """JSON-ready scores of generated waveforms (N, S) at spec.sample_rate with intended labels (N,):
    ``pocketsphinx_accuracy`` (digits only), ``classifier_accuracy``, ``fd_classifier`` against
    `real_logmels` with ``fd_real_floor`` (FD between two random halves of the real set: the
    value a perfect generator would reach with this many clips), ``duration_error_seconds``."""
    waves = _as_numpy_waves(generated)
    out: dict[str, Any] = {"num_samples": int(waves.shape[0])}
    if use_pocketsphinx:
        out["pocketsphinx_accuracy"] = spoken_digit_accuracy(waves, labels, spec.sample_rate, recogniser)
    if classifier is not None:
        logmels = waveform_to_logmel(waves, spec)
        out["classifier_accuracy"] = classifier.accuracy(logmels, labels)
        if real_logmels is not None and len(real_logmels) >= 4 and len(logmels) >= 2:
            out["fd_classifier"] = fd_classifier(classifier, real_logmels, logmels)
            perm = torch.randperm(len(real_logmels), generator=torch.Generator().manual_seed(seed))
            half = len(perm) // 2
            out["fd_real_floor"] = fd_classifier(classifier, real_logmels[perm[:half]], real_logmels[perm[half:]])
    if target_seconds is not None:
        out["duration_error_seconds"] = duration_error(waves, target_seconds, spec.sample_rate)
    return out


# ------------------------------------------------------------------------------------------------
# A checkpoint's samples, scored (``ditkit eval`` on an audio run, benchmarks/audio.py)
# ------------------------------------------------------------------------------------------------


def evaluate_audio(
    pipe: Any,
    num_samples: int = 200,
    *,
    sampler: Optional[str] = None,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    seed: Optional[int] = None,
    duration: Optional[float] = None,
    batch_size: int = 100,
    cache_dir: str | Path | None = None,
    use_pocketsphinx: Optional[bool] = None,
    allow_untrained_uncond: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Sample ``num_samples`` clips from an ``AudioPipeline`` (labels cycling over the classes) and
    score them against the run's own training clips (``ditkit.data.audio.load_audio_dataset``):
    ``audio_report`` (pocketsphinx accuracy when the classes are the ten digit words, or
    ``use_pocketsphinx``; classifier accuracy; FD in the classifier's features with the real-vs-real
    floor), the mean audible seconds of generated and real clips, and the sampling time and
    real-time factor (seconds of audio per second of compute, network + vocoder). The classifier is
    trained on the training clips and cached under ``cache_dir`` (None: not cached)."""
    import time

    from ditkit.data.audio import load_audio_dataset

    cfg = pipe.cfg
    k = pipe.num_classes
    if k == 0:
        raise ConfigError("audio evaluation scores class-conditional models (the judges need labels)")
    labels = [i % k for i in range(num_samples)]
    start = time.perf_counter()
    out = pipe(class_labels=labels, num_samples=num_samples, sampler=sampler, num_inference_steps=num_sampling_steps,
               guidance_scale=cfg_scale, seed=seed, duration=duration, batch_size=batch_size, progress=progress,
               allow_untrained_uncond=allow_untrained_uncond)
    seconds = time.perf_counter() - start
    real = load_audio_dataset(cfg.data)
    real_logmels = real.images.float() / 127.5 - 1.0
    if real.labels is None:
        raise ConfigError(f"{real.source} has no labels: audio evaluation needs the labelled training clips")
    classifier = get_mel_classifier(real_logmels, real.labels, cache_dir, num_classes=k)
    digits = [n.lower() for n in pipe.class_names] == list(DIGIT_WORDS)
    spec = pipe.spec
    report = audio_report(out.waveforms, torch.tensor(labels), spec, classifier=classifier, real_logmels=real_logmels,
                          use_pocketsphinx=digits if use_pocketsphinx is None else use_pocketsphinx, seed=0)
    clip_seconds = out.waveforms.shape[1] / out.sample_rate
    report.update({
        "classifier_holdout_accuracy": classifier.info.get("holdout_accuracy"),
        "classifier_hash": classifier.hash,
        "audible_seconds_generated": float(np.mean(audible_seconds(out.waveforms, out.sample_rate))),
        "audible_seconds_real": float(real.seconds.mean()),
        "sampling_seconds": seconds,
        "real_time_factor": num_samples * clip_seconds / seconds,
        "sampling": {key: out.metadata[key] for key in ("sampler", "num_sampling_steps", "cfg_scale", "seed",
                                                        "duration_seconds", "vocoder")},
        "checkpoint": out.metadata["checkpoint"],
        "checkpoint_sha256": out.metadata["checkpoint_sha256"],
        "step": out.metadata["step"],
        "weights": out.metadata["weights"],
        "reference": real.source,
    })
    return report

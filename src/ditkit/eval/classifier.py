"""Offline feature extractor: a small CNN classifier that ditkit trains on the labelled dataset.

Its penultimate layer is the feature space for "FD (classifier features)" and for precision /
recall; its predictions give conditional accuracy. It is *not* Inception, so the Fréchet distance
in its features is never called FID and is only comparable between runs that use the same
classifier, which is identified by a hash of the training data and of its full configuration.

Training is deterministic given `ClassifierConfig.seed` (on a given device and thread count), and
the result is cached as `<cache_dir>/classifier-<hash>/{model.safetensors, classifier.json}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ditkit.eval.images import images_to_uint8

ARCHITECTURE = "ditkit-cnn-v1"  # bump when SmallCNN changes: the hash (and every cached file) changes with it
FEATURE_EXTRACTOR_NAME = "classifier"  # results call its Fréchet distance "FD (classifier features)"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training settings of the feature classifier (all of it enters the hash)."""

    width: int = 32  # channels of the first stage; doubled per stage, capped at 4 * width
    feature_dim: int = 128  # penultimate width: the feature space of FD and precision/recall
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3  # AdamW peak, cosine decay to 0
    weight_decay: float = 5e-4
    max_shift: int = 1  # augmentation: random translation by up to this many pixels
    holdout_fraction: float = 0.1  # share of the data kept out of training to measure accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width % 8:
            raise ValueError(f"classifier width {self.width} must be a multiple of 8 (GroupNorm uses 8 groups)")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction {self.holdout_fraction} must lie in [0, 1)")


class SmallCNN(nn.Module):
    """Conv stages (2 x conv3x3-GroupNorm-ReLU, 2x average pool between stages) -> 4x4 pool ->
    Linear-ReLU (features) -> Linear (logits).

    Input (B, C, H, W) in [-1, 1]; stages are added until the map is at most 4x4 (two at 8x8,
    four at 32x32).
    """

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int, feature_dim: int
    ):
        super().__init__()
        num_stages = max(2, math.ceil(math.log2(max(image_size) / 4)) + 1)
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(num_stages):
            out = width * min(2**stage, 4)
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.GroupNorm(8, out),
                nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.GroupNorm(8, out),
                nn.ReLU(),
            ]
            if stage < num_stages - 1:
                layers.append(nn.AvgPool2d(2, ceil_mode=True))
            channels = out
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate activations."""
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(x))


@dataclass
class Classifier:
    """A trained SmallCNN with its identity: `hash` names it in results and cache keys."""

    model: SmallCNN
    hash: str
    info: dict[str, Any]  # architecture, training config, data hash, held-out accuracy, versions

    name = FEATURE_EXTRACTOR_NAME

    @property
    def num_classes(self) -> int:
        return int(self.info["architecture"]["num_classes"])

    @torch.no_grad()
    def features_and_logits(
        self, images: torch.Tensor, batch_size: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W), uint8 or float in [-1, 1] -> features (N, feature_dim) and logits
        (N, num_classes), float32 on the CPU. Float images are quantised to uint8 first."""
        arch = self.info["architecture"]
        expected = (arch["in_channels"], *arch["image_size"])
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"classifier {self.hash} was trained on images (C, H, W) = {expected}, got {tuple(images.shape)}"
            )
        device = next(self.model.parameters()).device
        self.model.eval()
        feats, logits = [], []
        for start in range(0, images.shape[0], batch_size):
            x = _to_model_input(images[start : start + batch_size].to(device))
            f = self.model.features(x)
            feats.append(f.float().cpu())
            logits.append(self.model.head(f).float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images (N, C, H, W) -> (N, feature_dim) penultimate features."""
        return self.features_and_logits(images, batch_size)[0]


def _to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float [-1, 1] (B, C, H, W) -> float32 [-1, 1] on the 8-bit grid.

    Standard (NCHW-contiguous) strides are forced: a permuted NHWC array would otherwise send the
    convolutions down the channels-last path and change features in the last float bits.
    """
    return images_to_uint8(images).to(torch.float32, memory_format=torch.contiguous_format) / 127.5 - 1.0


def conditional_accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples (N, C, H, W) that the classifier assigns to the
    requested class `labels` (N,)."""
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"need one requested label per sample: {images.shape[0]} images, labels {tuple(labels.shape)}")
    _, logits = classifier.features_and_logits(images)
    return accuracy_from_logits(logits, labels)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of logits (N, K) against labels (N,)."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) (the classifier's classes)")
    return float((logits.argmax(dim=1) == labels.cpu()).double().mean())


def hash_dataset(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """sha256 (hex) of the dataset quantised to uint8 (N, C, H, W), its shape and its labels (N,)."""
    digest = hashlib.sha256()
    pixels = images_to_uint8(images).cpu().contiguous()
    digest.update(json.dumps(list(pixels.shape)).encode())
    digest.update(pixels.numpy().tobytes())
    if labels is not None:
        digest.update(b"labels")
        digest.update(torch.as_tensor(labels).to(torch.int64).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (B, C, H, W) by a random integer offset in [-max_shift, max_shift]^2
    (edge pixels replicated)."""
    if max_shift == 0:
        return x
    height, width = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dy, dx in offsets.unique(dim=0).tolist():
        rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1).to(x.device)
        out[rows] = padded[rows, :, dy : dy + height, dx : dx + width]
    return out


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: ClassifierConfig = ClassifierConfig(),
    device: str | torch.device = "cpu",
) -> tuple[SmallCNN, float | None]:
    """Train a SmallCNN on images (N, C, H, W) (uint8 or float in [-1, 1]) and labels (N,).

    Returns the model (eval mode) and its accuracy on the held-out `config.holdout_fraction` of the
    data (a seeded random split; None when the fraction is 0).
    """
    x_all = _to_model_input(images.cpu())
    y_all = torch.as_tensor(labels).to(torch.int64).cpu()
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(x_all.shape[0], generator=generator)
    num_holdout = int(round(config.holdout_fraction * x_all.shape[0]))
    holdout, train = order[:num_holdout], order[num_holdout:]
    x_train, y_train = x_all[train].to(device), y_all[train].to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = SmallCNN(x_all.shape[1], tuple(x_all.shape[2:]), num_classes, config.width, config.feature_dim)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(x_train.shape[0] / config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / total_steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    for _ in range(config.epochs):
        perm = torch.randperm(x_train.shape[0], generator=generator).to(device)
        for start in range(0, x_train.shape[0], config.batch_size):
            idx = perm[start : start + config.batch_size]
            batch = _random_shift(x_train[idx], config.max_shift, generator)
            loss = F.cross_entropy(model(batch), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()

    accuracy = None
    if num_holdout:
        with torch.no_grad():
            chunks = [holdout[i : i + 512] for i in range(0, num_holdout, 512)]
            logits = torch.cat([model(x_all[chunk].to(device)).cpu() for chunk in chunks])
        accuracy = accuracy_from_logits(logits, y_all[holdout])
    return model, accuracy


def tool_versions() -> dict[str, str]:
    """Versions that affect the numbers: ditkit, torch, numpy, python."""
    import platform

    import ditkit

    return {
        "ditkit": ditkit.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


MIN_HOLDOUT_FOR_CHECK = 50  # held-out images below which the accuracy is too noisy to judge by


def _learned(accuracy: float | None, num_classes: int, num_holdout: int) -> bool:
    """Whether a classifier's held-out accuracy shows it learned: at least 0.5 and three times
    chance. The built-in sets reach 0.95-0.99; a dead network sits at chance. Not judged (True)
    without a held-out split or with fewer than ``MIN_HOLDOUT_FOR_CHECK`` held-out images (a
    40-image folder holds out 4)."""
    if accuracy is None or num_holdout < MIN_HOLDOUT_FOR_CHECK:
        return True
    return accuracy >= max(0.5, 3.0 / num_classes)


def get_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    cache_dir: str | Path,
    config: ClassifierConfig = ClassifierConfig(),
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    data_hash: str | None = None,
    verbose: bool = False,
) -> tuple[Classifier, str]:
    """Load the classifier for this dataset and config from `cache_dir`, training it if absent.

    Args:
        images: (N, C, H, W) float in [-1, 1] or uint8; any small size (8x8 to 32x32 and up).
        labels: (N,) int class labels in [0, num_classes).
        cache_dir: directory for `classifier-<hash>/`.
        config: architecture + training settings; part of the hash.
        num_classes: defaults to labels.max() + 1.
        data_hash: precomputed `hash_dataset(images, labels)` (saves re-hashing large data).
    Returns:
        (classifier, hash). `hash` (16 hex chars) identifies data + architecture + config.
    Raises:
        RuntimeError: the classifier did not learn (held-out accuracy below 0.5 or three times
            chance, at ``config.learning_rate`` and again at a third of it; judged with at least
            ``MIN_HOLDOUT_FOR_CHECK`` held-out images); a cached classifier that never learned is
            trained again.
    """
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if num_classes < 2:
        raise ValueError("the feature classifier needs at least 2 classes; for unlabelled data use --inception-weights")
    architecture = {
        "name": ARCHITECTURE,
        "in_channels": int(images.shape[1]),
        "image_size": [int(images.shape[2]), int(images.shape[3])],
        "num_classes": num_classes,
        "width": config.width,
        "feature_dim": config.feature_dim,
    }
    data_hash = data_hash or hash_dataset(images, labels)
    key = {"architecture": architecture, "training": dataclasses.asdict(config), "data_hash": data_hash}
    classifier_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir).expanduser()
    folder = cache_dir / f"classifier-{classifier_hash}"

    def build() -> SmallCNN:
        image_size = tuple(architecture["image_size"])
        return SmallCNN(architecture["in_channels"], image_size, num_classes, config.width, config.feature_dim)

    num_holdout = int(round(config.holdout_fraction * images.shape[0]))  # as train_classifier splits
    if (folder / "classifier.json").is_file() and (folder / "model.safetensors").is_file():
        info = json.loads((folder / "classifier.json").read_text())
        if _learned(info.get("holdout_accuracy"), num_classes, num_holdout):
            model = build()
            model.load_state_dict(load_file(folder / "model.safetensors"))
            model.to(device).eval()
            return Classifier(model, classifier_hash, info), classifier_hash
        # cached before the check below existed: a network that never learned; train it again
        shutil.rmtree(folder, ignore_errors=True)

    start = time.perf_counter()
    used = config
    model, accuracy = train_classifier(images, labels, num_classes, used, device)
    if not _learned(accuracy, num_classes, num_holdout):
        # At lr 3e-3 the 28x28 MNIST subset kills every ReLU of the feature layer in the first
        # epoch (held-out accuracy 0.07, constant features: FD 0 for any samples). A third of the
        # rate trains it (0.95 after 3 epochs). Deterministic, so the hash still names the result.
        first = accuracy
        used = dataclasses.replace(config, learning_rate=config.learning_rate / 3)
        model, accuracy = train_classifier(images, labels, num_classes, used, device)
        if not _learned(accuracy, num_classes, num_holdout):
            raise RuntimeError(
                f"the feature classifier did not learn this data (held-out accuracy {first:.3f} at learning rate "
                f"{config.learning_rate:g}, {accuracy:.3f} at {used.learning_rate:g}; chance is {1 / num_classes:.3f}): "
                "its features would make FD and accuracy meaningless. Check that the labels match the images"
            )
    seconds = time.perf_counter() - start
    info = {
        "hash": classifier_hash,
        **key,
        "num_images": int(images.shape[0]),
        "holdout_accuracy": accuracy,
        "train_seconds": round(seconds, 2),
        "versions": tool_versions(),
    }
    if used is not config:
        info["trained_with"] = {"learning_rate": used.learning_rate,
                                "why": f"held-out accuracy {first:.3f} at learning rate {config.learning_rate:g}"}
    if verbose:
        print(f"trained feature classifier {classifier_hash} in {seconds:.1f}s, held-out accuracy {accuracy:.4f}")
    # Reference statistics are cached by classifier hash (ditkit.eval.evaluator); any left by an
    # earlier classifier of this hash (one that never learned) describe other features.
    for stale in cache_dir.glob(f"reference-{classifier_hash}-*.safetensors"):
        stale.unlink(missing_ok=True)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".classifier-{classifier_hash}-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "classifier.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp, folder)  # atomic publish; a concurrent writer of the same hash wins harmlessly
    except OSError:
        if not (folder / "classifier.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Classifier(model, classifier_hash, info), classifier_hash

"""Score generated images against the training data: the entry point of `ditkit eval` and of
periodic evaluation during training.

    evaluator = Evaluator(train_images, train_labels, cache_dir="~/.cache/ditkit/eval")
    results = evaluator.evaluate(samples, labels=requested_labels, metadata={"sampler": "ddim", ...})
    write_results_json(results, "eval.json")

Metrics (all against reference statistics of the training data, cached per dataset under
`cache_dir`, keyed by the hash of the data and of the feature extractor):
- `fd_classifier`: Fréchet distance in the penultimate features of ditkit's own classifier,
  reported as "FD (classifier features)" (it is not FID);
- `precision`, `recall`: improved precision/recall, k-NN manifolds (Kynkäänniemi et al. 2019);
- `conditional_accuracy`: fraction of samples the classifier assigns to the requested class;
- `inception_fid`, `inception_score`, `inception_score_std`: standard Inception metrics, only when
  `inception_weights` (the local pt_inception-2015-12-05 file) is given.

Every image is quantised to uint8 before it reaches a feature extractor (see `images.py`), so
tensors and `.npz` files of the same samples score the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ditkit.eval.classifier import (
    ARCHITECTURE,
    Classifier,
    ClassifierConfig,
    accuracy_from_logits,
    get_classifier,
    hash_dataset,
    tool_versions,
)
from ditkit.eval.frechet import feature_stats, frechet_distance
from ditkit.eval.images import images_to_uint8, load_npz_labels, load_npz_samples
from ditkit.eval.inception import InceptionExtractor, inception_score, torch_fidelity_version
from ditkit.eval.precision_recall import precision_recall
from ditkit.fileio import atomic_path, write_text

FD_CLASSIFIER_DISPLAY_NAME = "FD (classifier features)"


class FeatureExtractor(Protocol):
    """What a feature space needs: a name, a hash identifying it, and a batched forward."""

    name: str
    hash: str

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) -> features (N, D), logits (N, K)."""
        ...


@dataclass
class ReferenceStats:
    """Training-data statistics in one feature space: mu (D,), sigma (D, D) float64, and the
    features themselves (N, D) when precision/recall needs them."""

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None
    key: str


def reference_statistics(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    data_hash: str,
    cache_dir: str | Path,
    keep_features: bool = False,
) -> ReferenceStats:
    """Load or compute (and cache) the reference statistics of `images` (N, C, H, W) uint8.

    Cached as `<cache_dir>/reference-<extractor hash>-<data hash[:16]>.safetensors`.
    """
    key = f"{extractor.hash}-{data_hash[:16]}"
    path = Path(cache_dir) / f"reference-{key}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            if not keep_features or "features" in names:
                features = handle.get_tensor("features") if keep_features else None
                return ReferenceStats(
                    handle.get_tensor("mu").numpy(), handle.get_tensor("sigma").numpy(), features, key
                )
    features, _ = extractor.features_and_logits(images)
    mu, sigma = feature_stats(features)
    tensors = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}
    if keep_features:
        tensors["features"] = features.contiguous()
    metadata = {"extractor": extractor.name, "extractor_hash": extractor.hash, "data_hash": data_hash}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return ReferenceStats(mu, sigma, features if keep_features else None, key)


def _versions(with_inception: bool) -> dict[str, str]:
    versions = tool_versions()
    if with_inception:
        versions["torch_fidelity"] = torch_fidelity_version()
    return versions


def samples_to_uint8(samples: torch.Tensor | np.ndarray | str | Path) -> tuple[torch.Tensor, np.ndarray | None, str]:
    """Normalise any accepted samples input to uint8 (N, C, H, W).

    Accepts a float tensor (N, C, H, W) in [-1, 1], a uint8 tensor (N, C, H, W), a uint8 numpy
    array (N, H, W, C) (the `.npz` layout), or a path to an ADM-style `.npz`.
    Returns (images, labels stored in the `.npz` or None, a description of the source).
    """
    if isinstance(samples, (str, Path)):
        array = load_npz_samples(samples)
        images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        return images, load_npz_labels(samples), str(samples)
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.uint8 or samples.ndim != 4:
            raise ValueError(f"numpy samples must be uint8 (N, H, W, C), got {samples.dtype} {samples.shape}")
        return torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous(), None, "array"
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise TypeError("samples must be a (N, C, H, W) tensor, a uint8 (N, H, W, C) array or a .npz path")
    return images_to_uint8(samples.detach().cpu()), None, "tensor"


def _json_safe(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata as plain JSON types (tensors, paths and the like become strings)."""
    return json.loads(json.dumps(dict(metadata or {}), default=str))


class Evaluator:
    """Holds the reference data, the feature classifier and the reference statistics, so repeated
    evaluation (every K training steps) only pays for the samples.

    Args:
        reference_images: training images (N, C, H, W), float in [-1, 1] or uint8.
        reference_labels: (N,) int class labels; needed for the classifier metrics. Without labels,
            only the Inception metrics are available (and `inception_weights` is then required).
        cache_dir: where the classifier and reference statistics are cached.
        dataset_name: recorded in the results (the data hash is what identifies the data).
        classifier_config: architecture/training of the feature classifier (part of its hash).
        inception_weights: local path to pt_inception-2015-12-05-6726825d.pth; enables FID/IS.
        k: neighbourhood size of precision/recall.
        pr_max_samples: precision/recall use n = min(num samples, num reference, pr_max_samples)
            points from each set (seeded random subsets), as the paper compares equal-size sets.
        seed: seed of those subsets.
    """

    def __init__(
        self,
        reference_images: torch.Tensor,
        reference_labels: torch.Tensor | None = None,
        *,
        cache_dir: str | Path,
        dataset_name: str | None = None,
        classifier_config: ClassifierConfig = ClassifierConfig(),
        inception_weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        k: int = 3,
        pr_max_samples: int = 10_000,
        seed: int = 0,
        verbose: bool = False,
    ):
        if reference_images.ndim != 4:
            raise ValueError(f"reference images must be (N, C, H, W), got {tuple(reference_images.shape)}")
        if reference_labels is None and inception_weights is None:
            raise ValueError(
                "nothing to evaluate with: the feature classifier needs labelled reference data; "
                "for unlabelled data pass --inception-weights PATH"
            )
        self.cache_dir = Path(cache_dir).expanduser()
        self.dataset_name = dataset_name
        self.k = k
        self.pr_max_samples = pr_max_samples
        self.seed = seed
        self.inception: InceptionExtractor | None = None
        if inception_weights is not None:  # first, so a missing file fails before any training
            self.inception = InceptionExtractor(inception_weights, device)
        self.reference = images_to_uint8(reference_images.detach().cpu())
        labels = None if reference_labels is None else torch.as_tensor(reference_labels).to(torch.int64).cpu()
        self.data_hash = hash_dataset(self.reference, labels)
        self.classifier: Classifier | None = None
        self.classifier_stats: ReferenceStats | None = None
        if labels is not None:
            self.classifier, _ = get_classifier(
                self.reference,
                labels,
                self.cache_dir,
                classifier_config,
                device=device,
                data_hash=self.data_hash,
                verbose=verbose,
            )
            self.classifier_stats = reference_statistics(
                self.classifier, self.reference, self.data_hash, self.cache_dir, keep_features=True
            )
        self.inception_stats = None
        if self.inception is not None:
            self.inception_stats = reference_statistics(self.inception, self.reference, self.data_hash, self.cache_dir)

    def _subset(self, features: torch.Tensor, size: int, offset: int) -> torch.Tensor:
        if features.shape[0] == size:
            return features
        generator = torch.Generator().manual_seed(self.seed + offset)
        return features[torch.randperm(features.shape[0], generator=generator)[:size]]

    def evaluate(
        self,
        samples: torch.Tensor | np.ndarray | str | Path,
        labels: torch.Tensor | np.ndarray | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Score samples; see the module docstring for the metrics.

        Args:
            samples: float (N, C, H, W) in [-1, 1], uint8 (N, C, H, W) tensor, uint8 (N, H, W, C)
                array, or an ADM-style `.npz` path (whose `arr_1`, if present, gives the labels).
            labels: (N,) requested class of each sample, for conditional accuracy.
            metadata: passed through into results["sampling"] (sampler, num_sampling_steps,
                cfg_scale, checkpoint hash, seed, ...).
        Returns:
            {"metrics": {...}, "num_samples", "feature_extractor", "inception" (if used),
             "reference", "precision_recall", "sampling", "versions", "samples_source"}.
        """
        images, npz_labels, source = samples_to_uint8(samples)
        explicit_labels = labels is not None
        if labels is None and npz_labels is not None and self.classifier is not None:
            labels = npz_labels
        if tuple(images.shape[1:]) != tuple(self.reference.shape[1:]):
            raise ValueError(
                f"samples are (C, H, W) = {tuple(images.shape[1:])} but the reference data is "
                f"{tuple(self.reference.shape[1:])}; sample at the training resolution"
            )
        num = images.shape[0]
        if num <= self.k:
            raise ValueError(f"need more than k={self.k} samples to evaluate, got {num}")
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels)).to(torch.int64).cpu()
            if labels.shape != (num,):
                raise ValueError(f"need one requested label per sample: {num} samples, labels {tuple(labels.shape)}")
            if self.classifier is None and explicit_labels:
                raise ValueError("conditional accuracy needs the feature classifier: pass reference labels")

        metrics: dict[str, float] = {}
        results: dict[str, Any] = {"metrics": metrics, "num_samples": num}
        if self.classifier is not None and self.classifier_stats is not None:
            feats, logits = self.classifier.features_and_logits(images)
            reference = self.classifier_stats
            metrics["fd_classifier"] = frechet_distance(*feature_stats(feats), reference.mu, reference.sigma)
            size = min(num, self.reference.shape[0], self.pr_max_samples)
            real = self._subset(self.classifier_stats.features, size, offset=0)
            fake = self._subset(feats, size, offset=1)
            metrics["precision"], metrics["recall"] = precision_recall(real, fake, k=self.k)
            if labels is not None:
                metrics["conditional_accuracy"] = accuracy_from_logits(logits, labels)
            info = self.classifier.info
            results["feature_extractor"] = {
                "name": self.classifier.name,
                "display_name": FD_CLASSIFIER_DISPLAY_NAME,
                "hash": self.classifier.hash,
                "architecture": ARCHITECTURE,
                "feature_dim": int(feats.shape[1]),
                "holdout_accuracy": info.get("holdout_accuracy"),
                "training": info.get("training"),
            }
            results["precision_recall"] = {"k": self.k, "num_real": size, "num_fake": size, "seed": self.seed}
        if self.inception is not None and self.inception_stats is not None:
            pool, unbiased_logits = self.inception.features_and_logits(images)
            reference = self.inception_stats
            metrics["inception_fid"] = frechet_distance(*feature_stats(pool), reference.mu, reference.sigma)
            metrics["inception_score"], metrics["inception_score_std"] = inception_score(unbiased_logits)
            results["inception"] = {
                "name": self.inception.name,
                "hash": self.inception.hash,
                "weights_path": str(self.inception.weights_path),
                "weights_sha256": self.inception.weights_sha256,
            }
        results["reference"] = {
            "dataset": self.dataset_name,
            "data_hash": self.data_hash,
            "num_images": int(self.reference.shape[0]),
            "image_shape": list(self.reference.shape[1:]),
        }
        results["labels_given"] = labels is not None
        results["sampling"] = _json_safe(metadata)
        results["versions"] = _versions(self.inception is not None)
        results["samples_source"] = source
        return results


def evaluate(
    samples: torch.Tensor | np.ndarray | str | Path,
    reference_images: torch.Tensor,
    reference_labels: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | np.ndarray | None = None,
    cache_dir: str | Path,
    metadata: Mapping[str, Any] | None = None,
    **evaluator_kwargs: Any,
) -> dict[str, Any]:
    """One-shot `Evaluator(reference_images, reference_labels, cache_dir=..., **evaluator_kwargs)
    .evaluate(samples, labels, metadata)`; see `Evaluator` for the arguments."""
    evaluator = Evaluator(reference_images, reference_labels, cache_dir=cache_dir, **evaluator_kwargs)
    return evaluator.evaluate(samples, labels, metadata)


def write_results_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write evaluation results as indented JSON (strict: NaN/inf are refused). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(results, indent=2, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"results contain NaN or inf, which JSON cannot hold ({error}); check the samples") from error
    return write_text(path, text + "\n")


def summarize(results: Mapping[str, Any]) -> str:
    """One human-readable line, e.g. 'FD (classifier features) 3.21 | precision 0.812 | ...'."""
    metrics = results["metrics"]
    names = {
        "fd_classifier": FD_CLASSIFIER_DISPLAY_NAME,
        "precision": "precision",
        "recall": "recall",
        "conditional_accuracy": "conditional accuracy",
        "inception_fid": "FID (Inception)",
        "inception_score": "IS (Inception)",
    }
    parts = [f"{label} {metrics[key]:.4g}" for key, label in names.items() if key in metrics]
    return f"{' | '.join(parts)} | {results['num_samples']} samples"


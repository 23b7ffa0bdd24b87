"""Evaluate a model rather than a pile of samples: draw samples from a checkpoint (or the EMA model
during training) with labels cycling over the classes, and score them with an ``Evaluator`` built
on the training data the config names.

* ``build_evaluator(cfg, ...)``: the reference data of a run (``load_dataset(cfg.data)``) and its
  feature classifier / reference statistics, cached under ``ditkit.cache.cache_dir("eval")``.
* ``sample_for_eval(...)``: ``num_samples`` images (labels ``0, 1, ..., K-1, 0, ...``, sample ``i``
  seeded ``seed + i``) from a model in memory.
* ``evaluate_generator(...)``: one ``ditkit eval`` run on a loaded checkpoint; JSON-ready results.
* ``PeriodicEvaluator``: training-time evaluation of the EMA model every ``train.eval_every`` steps.

Conditional accuracy needs labelled data: the classifier is trained on the training labels and a
sample counts as correct when the classifier assigns it the class it was drawn for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ditkit.cache import cache_dir
from ditkit.config import Config, ConfigError
from ditkit.data import ImageDataset, load_dataset
from ditkit.eval.classifier import ClassifierConfig
from ditkit.eval.evaluator import Evaluator

__all__ = [
    "EVAL_METRICS",
    "CLASSIFIER_CONFIG",
    "default_eval_cache",
    "reference_dataset",
    "build_evaluator",
    "eval_labels",
    "sample_for_eval",
    "sampling_record",
    "evaluate_generator",
    "PeriodicEvaluator",
]

# What training logs per evaluation (and what the benchmark tabulates).
EVAL_METRICS = ("fd_classifier", "precision", "recall", "conditional_accuracy")

# The feature classifier of `ditkit eval` and of training-time evaluation (its settings enter its
# hash, so numbers are comparable between runs that use the same one).
CLASSIFIER_CONFIG = ClassifierConfig()


def default_eval_cache() -> Path:
    """``$DITKIT_CACHE_DIR/eval`` or ``~/.cache/ditkit/eval``: classifiers and reference statistics
    are keyed by data and extractor hashes, so every run on the same data shares them."""
    return cache_dir("eval")


def reference_dataset(cfg: Config) -> ImageDataset:
    """The training images of ``cfg`` (pixels, also for latent models), as training loads them."""
    if cfg.modality != "image":
        raise ConfigError("ditkit eval scores image models; for text models use the text evaluation (eval/text.py)")
    try:
        return load_dataset(cfg.data)
    except ConfigError as err:
        raise ConfigError(
            f"cannot load the reference data {cfg.data.dataset!r} of this checkpoint ({err}). Imported models record "
            "no data on disk: score samples against your own with --data PATH --image-size N"
        ) from None


def build_evaluator(
    cfg: Config,
    dataset: Optional[ImageDataset] = None,
    *,
    cache: Optional[str | Path] = None,
    inception_weights: Optional[str | Path] = None,
    device: torch.device | str = "cpu",
    verbose: bool = False,
    classifier_config: Optional[ClassifierConfig] = None,
) -> Evaluator:
    """An ``Evaluator`` on the training data of ``cfg`` (``dataset`` if already loaded). Trains the
    feature classifier the first time (seconds to a minute on a CPU for the small built-in sets)
    and caches it. Unlabelled data needs ``inception_weights``. Leaves torch's global RNG untouched."""
    dataset = reference_dataset(cfg) if dataset is None else dataset
    if dataset.labels is None and inception_weights is None:
        raise ConfigError(
            f"{dataset.source} has no labels, so ditkit cannot train its feature classifier: evaluate with "
            "standard Inception features instead (--inception-weights PATH to pt_inception-2015-12-05-6726825d.pth)"
        )
    with torch.random.fork_rng(devices=[]):
        return Evaluator(
            dataset.images, dataset.labels, cache_dir=Path(cache) if cache is not None else default_eval_cache(),
            dataset_name=cfg.data.dataset, inception_weights=inception_weights, device=device, verbose=verbose,
            classifier_config=classifier_config or CLASSIFIER_CONFIG,
        )


def eval_labels(cfg: Config, num_samples: int) -> Optional[list[int]]:
    """Labels ``0, 1, ..., K-1, 0, 1, ...`` for a class-conditional model (so every class is drawn
    equally and conditional accuracy is measured), None for an unconditional one."""
    k = cfg.data.num_classes or 0
    return [i % k for i in range(num_samples)] if k else None


@torch.no_grad()
def sample_for_eval(
    model: torch.nn.Module,
    cfg: Config,
    num_samples: int,
    *,
    seed: Optional[int] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae: Any = None,
    batch_size: int = 250,
    **sampling: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(images (N, C, H, W) in [-1, 1], requested labels (N,) or None)`` from ``model`` (eval
    mode, on ``device``); ``sampling`` options (sampler, num_sampling_steps, cfg_scale,
    timestep_spacing, guide_channels) default to ``cfg.sample``. Latent models need ``vae``."""
    if cfg.data.latent_channels and vae is None:
        raise ConfigError("this is a latent model: evaluation needs its VAE to decode the samples (--vae PATH)")
    from ditkit.pipelines.image import ImagePipeline

    pipe = ImagePipeline(model, cfg, device=device, dtype=dtype, vae=vae)
    labels = eval_labels(cfg, num_samples)
    out = pipe(class_labels=labels, num_samples=num_samples, seed=seed, batch_size=batch_size,
               allow_untrained_uncond=True, **_call_options(sampling))
    return out.tensors, None if labels is None else torch.tensor(labels, dtype=torch.int64)


def _call_options(sampling: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's argument names for the config-style sampling options."""
    names = {"num_sampling_steps": "num_inference_steps", "cfg_scale": "guidance_scale"}
    return {names.get(k, k): v for k, v in sampling.items()}


def sampling_record(
    pipe: Any,
    *,
    sampler: Optional[str] = None,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    timestep_spacing: Optional[str] = None,
    guide_channels: Optional[int] = None,
    seed: Optional[int] = None,
) -> dict[str, Any]:
    """The sampling settings as they will be used (None resolved from the checkpoint's ``sample``
    section by the pipeline ``pipe``), for results."""
    cfg = pipe.cfg
    sampler, steps, scale, spacing = pipe.check_options(sampler, num_sampling_steps, cfg_scale, timestep_spacing)
    record: dict[str, Any] = {"sampler": sampler, "num_sampling_steps": steps, "cfg_scale": scale}
    if spacing is not None:
        record["timestep_spacing"] = spacing
    record["guide_channels"] = guide_channels if guide_channels is not None else cfg.sample.guide_channels
    record["seed"] = cfg.sample.seed if seed is None else seed
    k = cfg.data.num_classes or 0
    record["labels"] = f"cycling over {k} classes" if k else "unconditional"
    return record


def evaluate_generator(
    generator: Any,
    evaluator: Evaluator,
    num_samples: int,
    *,
    sampler: Optional[str] = None,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    timestep_spacing: Optional[str] = None,
    guide_channels: Optional[int] = None,
    seed: Optional[int] = None,
    batch_size: int = 250,
    progress: Optional[Callable[[int], None]] = None,
    allow_untrained_uncond: bool = False,
) -> dict[str, Any]:
    """Sample ``num_samples`` images from a loaded checkpoint (an ``ImagePipeline``, ``generator``)
    with labels cycling over the classes, score them, and return the results dict of
    ``Evaluator.evaluate`` whose ``sampling`` entry holds the checkpoint (path, SHA-256, step,
    weights) and every sampling setting."""
    cfg = generator.cfg
    if cfg.data.latent_channels and generator.vae is None:
        raise ConfigError("this is a latent model: pass --vae PATH (its AutoencoderKL folder) to decode samples for evaluation")
    record = sampling_record(
        generator, sampler=sampler, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
        timestep_spacing=timestep_spacing, guide_channels=guide_channels, seed=seed,
    )
    t0 = time.time()
    result = generator(
        class_labels=eval_labels(cfg, num_samples), num_samples=num_samples, sampler=record["sampler"],
        num_inference_steps=record["num_sampling_steps"], guidance_scale=record["cfg_scale"],
        guide_channels=guide_channels, seed=record["seed"], batch_size=batch_size,
        timestep_spacing=timestep_spacing, progress=progress, allow_untrained_uncond=allow_untrained_uncond,
    )
    sample_s = time.time() - t0
    labels = None if result.labels is None else torch.tensor(result.labels, dtype=torch.int64)
    meta = result.metadata
    metadata = {
        "checkpoint": meta["checkpoint"],
        "checkpoint_sha256": meta["checkpoint_sha256"],
        "step": generator.step,
        "weights": meta["weights"],
        "model": meta["model"],
        "objective": meta["objective"],
        **record,
        "precision": meta["precision"],
        "software": meta["software"],
        "sampling_seconds": round(sample_s, 2),
    }
    if "vae" in meta:
        metadata["vae"] = meta["vae"]
    return evaluator.evaluate(result.tensors, labels, metadata)


class PeriodicEvaluator:
    """Evaluation during training: built once (classifier and reference statistics trained or
    loaded from the cache), then ``evaluator(ema_model)`` draws ``train.eval_samples`` samples with
    the run's ``sample`` settings and fixed seeds and returns ``{fd_classifier, precision, recall,
    conditional_accuracy, eval_samples, eval_seconds}``. Never touches the training RNGs (torch's
    global CPU and CUDA generators are forked around everything it does)."""

    def __init__(
        self,
        cfg: Config,
        dataset: ImageDataset,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae: Any = None,
        cache: Optional[str | Path] = None,
        log: Callable[[str], None] = print,
    ):
        if dataset.labels is None:
            raise ConfigError(
                "train.eval_every needs labelled data (its metrics use a classifier trained on the labels): "
                "set train.eval_every=0, or evaluate afterwards with ditkit eval --inception-weights PATH"
            )
        self.cfg, self.vae, self.log = cfg, vae, log
        self.device, self.dtype = torch.device(device), dtype
        self.num_samples = cfg.train.eval_samples
        t0 = time.time()
        with self._fork():
            self.evaluator = build_evaluator(cfg, dataset, cache=cache, device=self.device)
        holdout = (self.evaluator.classifier.info.get("holdout_accuracy") if self.evaluator.classifier else None)
        log(
            f"evaluation every {cfg.train.eval_every} steps on {self.num_samples} EMA samples: feature classifier "
            f"{self.evaluator.classifier.hash if self.evaluator.classifier else '-'} (held-out accuracy "
            f"{holdout if holdout is None else f'{holdout:.3f}'}), ready in {time.time() - t0:.1f} s"
        )

    def _fork(self) -> Any:
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        t0 = time.time()
        with self._fork():
            images, labels = sample_for_eval(
                model, self.cfg, self.num_samples, device=self.device, dtype=self.dtype, vae=self.vae
            )
            results = self.evaluator.evaluate(images, labels)
        metrics = {k: float(results["metrics"][k]) for k in EVAL_METRICS if k in results["metrics"]}
        return {**metrics, "eval_samples": self.num_samples, "eval_seconds": round(time.time() - t0, 2)}

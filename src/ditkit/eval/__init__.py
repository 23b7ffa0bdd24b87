"""Sample-quality evaluation, offline by default.

- `frechet`: Fréchet distance (float64, eigendecomposition-based matrix square root).
- `precision_recall`: improved precision/recall (Kynkäänniemi et al. 2019).
- `classifier`: ditkit's own feature classifier ("FD (classifier features)", conditional accuracy).
- `inception`: standard Inception FID/IS from a local weights file via torch-fidelity (optional).
- `evaluator`: `Evaluator` / `evaluate()` returning a JSON-ready dict; `write_results_json`.
- `images`: [-1, 1] float <-> uint8 conversion and ADM-style `.npz` samples.

The Inception module is not imported here: it needs the optional torch-fidelity package.
"""

from ditkit.eval.classifier import ClassifierConfig, Classifier, conditional_accuracy, get_classifier, hash_dataset
from ditkit.eval.evaluator import Evaluator, evaluate, reference_statistics, summarize, write_results_json
from ditkit.eval.frechet import feature_stats, frechet_distance
from ditkit.eval.images import (
    images_to_uint8,
    load_npz_labels,
    load_npz_samples,
    save_npz_samples,
    uint8_to_images,
)
from ditkit.eval.precision_recall import knn_radii, precision_recall
from ditkit.eval.text import (
    TextLikelihood,
    autoregressive_nll,
    distinct_ngrams,
    fraction_valid,
    masked_diffusion_bound,
    sampling_throughput,
    text_likelihood,
)

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "Evaluator",
    "conditional_accuracy",
    "evaluate",
    "feature_stats",
    "frechet_distance",
    "get_classifier",
    "hash_dataset",
    "images_to_uint8",
    "knn_radii",
    "load_npz_labels",
    "load_npz_samples",
    "precision_recall",
    "reference_statistics",
    "save_npz_samples",
    "summarize",
    "uint8_to_images",
    "write_results_json",
    "TextLikelihood",
    "autoregressive_nll",
    "distinct_ngrams",
    "fraction_valid",
    "masked_diffusion_bound",
    "sampling_throughput",
    "text_likelihood",
]

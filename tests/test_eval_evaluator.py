"""evaluate(): the JSON it writes, .npz input scoring like tensors, cached reference statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditkit.eval import Evaluator, evaluate, load_npz_samples, save_npz_samples, summarize, write_results_json
from ditkit.eval.evaluator import reference_statistics
from ditkit.eval.images import images_to_uint8, uint8_to_images


@pytest.fixture(scope="module")
def digits(digits_split):
    return digits_split


@pytest.fixture(scope="module")
def evaluator(digits):
    train_x, train_y, _, _, cache = digits
    return Evaluator(train_x, train_y, cache_dir=cache, dataset_name="sklearn-digits")


def test_evaluate_writes_json_with_the_promised_keys(digits, tmp_path):
    train_x, train_y, test_x, test_y, cache = digits
    metadata = {"sampler": "ddim", "num_sampling_steps": 50, "cfg_scale": 1.5, "checkpoint_hash": "abc123", "seed": 0}
    results = evaluate(
        test_x[:200], train_x, train_y, labels=test_y[:200], cache_dir=cache, metadata=metadata, dataset_name="digits"
    )
    path = write_results_json(results, tmp_path / "out" / "eval.json")
    loaded = json.loads(path.read_text())
    assert set(loaded["metrics"]) == {"fd_classifier", "precision", "recall", "conditional_accuracy"}
    assert loaded["num_samples"] == 200
    extractor = loaded["feature_extractor"]
    assert extractor["name"] == "classifier" and extractor["display_name"] == "FD (classifier features)"
    assert len(extractor["hash"]) == 16
    assert {"torch", "numpy", "ditkit"} <= set(loaded["versions"])
    assert loaded["sampling"] == metadata
    assert loaded["reference"]["dataset"] == "digits" and loaded["reference"]["num_images"] == len(train_x)
    assert loaded["precision_recall"] == {"k": 3, "num_real": 200, "num_fake": 200, "seed": 0}
    # Real held-out digits look like the training data in every metric.
    metrics = loaded["metrics"]
    assert metrics["conditional_accuracy"] >= 0.97
    assert metrics["precision"] > 0.7 and metrics["recall"] > 0.7
    assert "FD (classifier features)" in summarize(loaded)


def test_npz_samples_score_like_the_tensor_and_carry_labels(evaluator, digits, tmp_path):
    _, _, test_x, test_y, _ = digits
    path = tmp_path / "samples.npz"
    save_npz_samples(path, test_x[:100], test_y[:100])
    array = load_npz_samples(path)
    assert array.dtype == np.uint8 and array.shape == (100, 8, 8, 1)  # ADM layout: NHWC
    from_tensor = evaluator.evaluate(test_x[:100], labels=test_y[:100])
    from_npz = evaluator.evaluate(path)  # labels come from arr_1
    assert from_npz["metrics"] == from_tensor["metrics"]
    assert from_npz["samples_source"] == str(path)


def test_noisy_samples_score_worse(evaluator, digits):
    _, _, test_x, test_y, _ = digits
    noisy = test_x[:200] + 0.6 * torch.randn(test_x[:200].shape, generator=torch.Generator().manual_seed(0))
    clean = evaluator.evaluate(test_x[:200], labels=test_y[:200])["metrics"]
    worse = evaluator.evaluate(noisy, labels=test_y[:200])["metrics"]
    assert worse["fd_classifier"] > 2 * clean["fd_classifier"]
    assert worse["precision"] < clean["precision"]
    assert worse["conditional_accuracy"] < clean["conditional_accuracy"]


def test_reference_statistics_are_cached_per_data_and_extractor(evaluator, digits, monkeypatch):
    train_x, _, _, _, cache = digits
    classifier = evaluator.classifier
    path = cache / f"reference-{classifier.hash}-{evaluator.data_hash[:16]}.safetensors"
    assert path.is_file()

    def no_features(*args, **kwargs):
        raise AssertionError("cached statistics must not be recomputed")

    monkeypatch.setattr(classifier, "features_and_logits", no_features)
    stats = reference_statistics(classifier, evaluator.reference, evaluator.data_hash, cache, keep_features=True)
    np.testing.assert_array_equal(stats.mu, evaluator.classifier_stats.mu)
    assert stats.features.shape == (len(train_x), 128)


def test_image_conversions_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(images_to_uint8(uint8_to_images(pixels)), pixels)
    nhwc = pixels.permute(0, 2, 3, 1).numpy()
    assert torch.equal(uint8_to_images(nhwc, channels_last=True), uint8_to_images(pixels))
    assert images_to_uint8(torch.tensor([[[[-1.5, -1.0, 0.0, 1.0, 2.0]]]])).flatten().tolist() == [0, 0, 128, 255, 255]


def test_clear_errors(evaluator, digits, tmp_path):
    train_x, _, test_x, test_y, cache = digits
    with pytest.raises(ValueError, match="sample at the training resolution"):
        evaluator.evaluate(torch.zeros(10, 1, 16, 16))
    with pytest.raises(ValueError, match="one requested label per sample"):
        evaluator.evaluate(test_x[:10], labels=test_y[:9])
    with pytest.raises(ValueError, match="--inception-weights"):
        Evaluator(train_x, None, cache_dir=cache)
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((4, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        evaluator.evaluate(bad)
    with pytest.raises(ValueError, match="NaN"):
        write_results_json({"metrics": {"fd_classifier": float("nan")}}, tmp_path / "nan.json")

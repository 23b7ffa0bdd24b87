"""Inception FID/IS wiring: the missing-file error, file validation, the Inception Score formula,
and the path through torch-fidelity: faked to check the wiring, then the real torch-fidelity network
(installed without torchvision) on a random weights file of the real shapes (the real weights
cannot be downloaded here)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ditkit.eval.evaluator import Evaluator
from ditkit.eval.frechet import feature_stats, frechet_distance
from ditkit.eval.inception import (
    PYTORCH_FID_WEIGHTS_URL,
    InceptionExtractor,
    check_inception_weights,
    inception_score,
)


def test_missing_weights_file_says_where_it_comes_from(tmp_path):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(FileNotFoundError) as info:
        check_inception_weights(missing)
    message = str(info.value)
    assert str(missing) in message
    assert PYTORCH_FID_WEIGHTS_URL in message
    assert "pt_inception-2015-12-05" in message and "--inception-weights" in message
    assert "never downloads" in message


def test_missing_weights_fail_before_any_work(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("must fail on the missing file before training a classifier")

    monkeypatch.setattr("ditkit.eval.evaluator.get_classifier", no_training)
    images = torch.zeros(8, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        Evaluator(images, torch.arange(8) % 2, cache_dir=tmp_path, inception_weights=tmp_path / "missing.pth")


def test_wrong_file_is_rejected_with_the_same_guidance(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(1000, 512)}, wrong)
    with pytest.raises(ValueError, match=r"not the FID InceptionV3 state dict.*fc\.weight"):
        InceptionExtractor(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        InceptionExtractor(garbage)


def test_inception_score_limits():
    num_classes = 10
    confident = 100.0 * torch.nn.functional.one_hot(torch.arange(1000) % num_classes, 1008).float()
    mean, std = inception_score(confident, splits=1)
    assert mean == pytest.approx(num_classes, rel=1e-6)  # confident and uniform over 10 classes
    assert std == 0.0
    mean, _ = inception_score(torch.zeros(1000, 1008))  # p(y|x) = p(y): no information
    assert mean == pytest.approx(1.0, abs=1e-9)
    mean, std = inception_score(confident, splits=10)  # shuffled splits are nearly balanced
    assert 9.0 < mean <= 10.0 and std > 0


class _FakeInception(torch.nn.Module):
    """Stands in for torch_fidelity's FeatureExtractorInceptionV3: records its inputs and returns
    deterministic (pool, logits) features from the uint8 pixels (64-wide pool instead of 2048 to
    keep the test fast; ditkit does not depend on the width)."""

    calls: list = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__()
        assert feature_extractor_weights_path is not None, "ditkit must always pass the local file"
        assert features_list == ["2048", "logits_unbiased"]
        self.projection = torch.randn(3 * 8 * 8, 64, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        _FakeInception.calls.append((x.dtype, tuple(x.shape)))
        pool = (x.float().flatten(1) / 255) @ self.projection
        return pool, pool[:, :32]


@pytest.fixture
def fake_torch_fidelity(monkeypatch, tmp_path):
    package = types.ModuleType("torch_fidelity")
    package.__version__ = "fake"
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = _FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, weights)
    _FakeInception.calls = []
    return weights


def test_inception_metrics_wired_through_torch_fidelity(fake_torch_fidelity, tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(64, 1, 8, 8, generator=generator) * 2 - 1  # unlabelled: Inception only
    samples = torch.rand(40, 1, 8, 8, generator=generator) * 2 - 1
    evaluator = Evaluator(reference, None, cache_dir=tmp_path / "cache", inception_weights=fake_torch_fidelity)
    results = evaluator.evaluate(samples)
    # Grayscale uint8 images are expanded to 3 channels and handed over unresized.
    assert _FakeInception.calls and all(call == (torch.uint8, (call[1][0], 3, 8, 8)) for call in _FakeInception.calls)
    metrics = results["metrics"]
    assert set(metrics) == {"inception_fid", "inception_score", "inception_score_std"}
    extractor = evaluator.inception
    ref_feats = extractor.features(evaluator.reference)
    sample_feats = extractor.features(((samples.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8))
    expected = frechet_distance(*feature_stats(sample_feats), *feature_stats(ref_feats))
    assert metrics["inception_fid"] == pytest.approx(expected, rel=1e-9)
    assert results["inception"]["weights_sha256"] and results["versions"]["torch_fidelity"] == "fake"
    assert (tmp_path / "cache" / f"reference-{extractor.hash}-{evaluator.data_hash[:16]}.safetensors").is_file()


# --- the real torch-fidelity network (installed with --no-deps; no torchvision), random weights ---


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    # torch-fidelity is a test dependency (scripts/setup.sh installs it): a missing one fails here.
    from inception_helpers import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


def test_real_torch_fidelity_network_runs_without_torchvision(random_inception_file):
    extractor = InceptionExtractor(random_inception_file)
    assert type(extractor.model).__module__ == "torch_fidelity.feature_extractor_inceptionv3"
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats, logits = extractor.features_and_logits(images, batch_size=4)
    assert feats.shape == (6, 2048) and logits.shape == (6, 1008)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    assert feats.std(dim=0).mean() > 1e-3  # the random network still tells images apart
    # The same images one at a time give the same features (no batch coupling, eval mode).
    single, _ = extractor.features_and_logits(images[:1])
    torch.testing.assert_close(single, feats[:1], rtol=1e-4, atol=1e-5)


def test_inception_fid_and_is_end_to_end_on_the_real_network(random_inception_file, tmp_path):
    generator = torch.Generator().manual_seed(1)
    # Smooth random "images": low-resolution noise upsampled, so Gaussian noise added below is a
    # distortion of growing strength, as in the FD tests of the classifier features.
    base = torch.nn.functional.interpolate(torch.rand(16, 3, 4, 4, generator=generator) * 2 - 1, size=16, mode="bilinear")
    evaluator = Evaluator(base, None, cache_dir=tmp_path / "cache", inception_weights=random_inception_file)
    fids = []
    for sigma in (0.0, 0.2, 0.6):
        noisy = (base + sigma * torch.randn(base.shape, generator=generator)).clamp(-1, 1)
        results = evaluator.evaluate(noisy)
        fids.append(results["metrics"]["inception_fid"])
    assert fids[0] < 1e-6 * max(fids[2], 1.0)  # FID(X, X) ~ 0
    assert fids[0] < fids[1] < fids[2]  # and it grows with the distortion
    assert results["inception"]["weights_sha256"] and results["versions"]["torch_fidelity"] not in ("", "unknown")


@pytest.mark.parametrize("broken", ["missing", "runtime_error"])
def test_fallback_loads_the_network_when_torchvision_is_missing_or_broken(broken, monkeypatch):
    """torchvision absent (ImportError) or built for another torch (RuntimeError at import, as
    PyPI's torchvision beside a CPU torch): the InceptionV3 module still loads, and no stand-in
    torch_fidelity package is left behind."""
    from ditkit.eval.inception import torch_fidelity_inception_class

    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith(("torch_fidelity.", "torchvision"))]:
        monkeypatch.delitem(sys.modules, name)
    if broken == "missing":
        monkeypatch.setitem(sys.modules, "torchvision", None)  # "import torchvision" raises ImportError
    else:
        class _BrokenFinder:
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision":
                    raise RuntimeError("operator torchvision::nms does not exist")
                return None

        monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    cls = torch_fidelity_inception_class()
    assert cls.__name__ == "FeatureExtractorInceptionV3"
    assert cls.__module__ == "torch_fidelity.feature_extractor_inceptionv3"
    assert "torch_fidelity" not in sys.modules  # the stand-in package is gone again

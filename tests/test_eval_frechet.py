"""Fréchet distance: agreement with scipy's sqrtm formula, FD(X, X) = 0, symmetry, an analytic
singular case, and monotone growth under noise / blur of real digits in classifier features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditkit.eval.classifier import get_classifier
from ditkit.eval.frechet import feature_stats, frechet_distance


def _random_covariance(dim: int, rng: np.random.Generator, num: int | None = None) -> np.ndarray:
    x = rng.standard_normal((num or 4 * dim, dim)) @ rng.standard_normal((dim, dim))
    return np.cov(x, rowvar=False)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The pytorch-fid formula with scipy.linalg.sqrtm (reference implementation for the test)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = scipy_linalg.sqrtm(sigma1 @ sigma2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [4, 32])
def test_matches_scipy_sqrtm_formula(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = _random_covariance(dim, rng), _random_covariance(dim, rng)
    expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_identical_sets_give_zero_and_distance_is_symmetric():
    rng = np.random.default_rng(0)
    feats_a = rng.standard_normal((300, 24)) * 3.0 + 1.0
    feats_b = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    mu_a, sigma_a = feature_stats(feats_a)
    mu_b, sigma_b = feature_stats(feats_b)
    scale = np.trace(sigma_a)
    assert abs(frechet_distance(mu_a, sigma_a, mu_a, sigma_a)) < 1e-9 * scale
    ab = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    ba = frechet_distance(mu_b, sigma_b, mu_a, sigma_a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_singular_covariances_match_closed_form():
    # Covariances sharing an eigenbasis Q: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, even with zero eigenvalues (rank-deficient).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    a = np.array([4.0, 1.0, 0.25, 0, 0, 0, 2.0, 0, 9.0, 0])
    b = np.array([1.0, 1.0, 0, 0, 3.0, 0, 0.5, 0, 0, 0])
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    sigma1, sigma2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_feature_stats_matches_numpy_and_accepts_tensors():
    feats = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(feats[:1])


# --- monotone growth on real images (sklearn digits), in the classifier's features -------------


@pytest.fixture(scope="module")
def digits_setup(digits_split):
    train_x, train_y, test_x, _, cache = digits_split
    classifier, _ = get_classifier(train_x, train_y, cache)
    reference = feature_stats(classifier.features(train_x))
    return classifier, reference, test_x


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def _fd_to_reference(classifier, reference, images) -> float:
    return frechet_distance(*feature_stats(classifier.features(images.clamp(-1, 1))), *reference)


def test_fd_rises_with_gaussian_noise_on_real_digits(digits_setup):
    classifier, reference, test_images = digits_setup
    noise = torch.randn(test_images.shape, generator=torch.Generator().manual_seed(0))
    strengths = [0.0, 0.1, 0.2, 0.4, 0.8]
    fds = [_fd_to_reference(classifier, reference, test_images + s * noise) for s in strengths]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert fds[-1] > 5 * fds[0], fds  # real held-out digits are far closer than heavily noised ones


def test_fd_rises_with_blur_on_real_digits(digits_setup):
    classifier, reference, test_images = digits_setup
    sigmas = [0.0, 0.5, 1.0, 1.5, 2.5]
    fds = [_fd_to_reference(classifier, reference, _gaussian_blur(test_images, s)) for s in sigmas]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds

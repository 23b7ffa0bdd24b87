"""Fréchet distance between Gaussians fitted to feature sets, in float64.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})
(Dowson & Landau 1982; used as FID by Heusel et al. 2017, eq. 6).

The trace of the matrix square root is computed without a general (non-symmetric) `sqrtm`:
S1 S2 is similar to the symmetric PSD matrix A = S1^{1/2} S2 S1^{1/2}
(S1 S2 = S1^{1/2} A S1^{-1/2} when S1 is invertible, and by continuity otherwise), so
tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A)). Both S1^{1/2} and the eigenvalues of A come from
`numpy.linalg.eigh` on symmetric matrices, with round-off eigenvalues (negative or below
D * eps * the largest) set to zero.
This stays real and accurate for singular covariances (fewer samples than feature dimensions),
where `scipy.linalg.sqrtm` needs an ad-hoc diagonal offset. No scipy at run time.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
        features: (N, D) features, N >= 2.
    Returns:
        mu (D,) and sigma (D, D), the unbiased (N - 1) sample covariance, as in pytorch-fid.
    """
    feats = _as_float64(features)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    if not np.all(np.isfinite(feats)):
        raise ValueError("features contain NaN or inf; check the images fed to the feature extractor")
    mu = feats.mean(axis=0)
    centred = feats - mu
    sigma = centred.T @ centred / (feats.shape[0] - 1)
    return mu, sigma


def _clean_eigenvalues(eigvals: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are round-off: below D * eps * max |lambda|.

    eigh returns such eigenvalues as +-1e-16-ish noise; their square roots (~1e-8) would add up to
    an error far larger than the round-off itself, so exact zeros (singular covariances) stay exact.
    """
    tol = eigvals.shape[0] * np.finfo(np.float64).eps * float(np.abs(eigvals).max(initial=0.0))
    return np.where(eigvals > tol, eigvals, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues -> 0)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(_clean_eigenvalues(eigvals))) @ eigvecs.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 (D, D), via eigenvalues of S1^{1/2} S2 S1^{1/2}."""
    s1 = _as_float64(sigma1)
    s2 = _as_float64(sigma2)
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    inner = (inner + inner.T) / 2  # exact symmetry for eigh
    eigvals = _clean_eigenvalues(np.linalg.eigvalsh(inner))
    return float(np.sqrt(eigvals).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) symmetric PSD covariances.
    Returns:
        The squared Fréchet (2-Wasserstein) distance, >= 0 (round-off below zero is clamped to 0).
    """
    m1, m2 = _as_float64(mu1), _as_float64(mu2)
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"means must be (D,) of equal shape, got {m1.shape} and {m2.shape}")
    dim = m1.shape[0]
    if s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(f"covariances must be ({dim}, {dim}), got {s1.shape} and {s2.shape}")
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(value), 0.0)

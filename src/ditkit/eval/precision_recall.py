"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", sec. 2, eq. 1-2).

Each set's manifold is the union of balls around its points, the radius of a ball being the
distance to the point's k-th nearest neighbour within its own set (k = 3 in the paper).
Precision = fraction of generated points inside the real manifold (fidelity);
recall = fraction of real points inside the generated manifold (coverage).

Distances are computed in row chunks with `torch.cdist` in the direct (non-matmul) mode, so a
point's distance to itself, or to an exact duplicate, is exactly 0 and ties are decided exactly.
"""

from __future__ import annotations

import torch


def _as_features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) computed from explicit differences (exact self-distance 0)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor, k: int = 3, chunk_size: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded).

    Args:
        features: (N, D), N > k.
    Returns:
        (N,) radii.
    """
    feats = _as_features(features, "features")
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {feats.shape[0]}")
    radii = []
    for start in range(0, feats.shape[0], chunk_size):
        dists = _pairwise_distances(feats[start : start + chunk_size], feats)
        # The smallest distance in each row is the point itself (0), so the k-th neighbour is the
        # (k + 1)-th smallest value.
        radii.append(dists.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def fraction_in_manifold(
    queries: torch.Tensor, support: torch.Tensor, support_radii: torch.Tensor, chunk_size: int = 1024
) -> float:
    """Fraction of `queries` (M, D) inside any ball B(support_i, support_radii_i), support (N, D)."""
    queries = _as_features(queries, "queries")
    support = _as_features(support, "support")
    radii = support_radii.to(torch.float32)[None, :]  # (1, N)
    inside = 0
    for start in range(0, queries.shape[0], chunk_size):
        dists = _pairwise_distances(queries[start : start + chunk_size], support)  # (m, N)
        inside += int((dists <= radii).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = 3,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Improved precision and recall of generated features against real features.

    Args:
        real_features: (N, D) features of reference images.
        fake_features: (M, D) features of generated images, same feature space.
        k: neighbourhood size for the manifold radii (paper default 3).
    Returns:
        (precision, recall), each in [0, 1]. The estimate depends on set sizes; compare runs at
        equal N and M (the paper uses N = M).
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    precision = fraction_in_manifold(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = fraction_in_manifold(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return precision, recall

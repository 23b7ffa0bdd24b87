"""Improved precision/recall: k-NN radii, a hand-computed case, a set against itself, shifted sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditkit.eval.precision_recall import fraction_in_manifold, knn_radii, precision_recall


def test_knn_radii_match_brute_force_and_ignore_chunking():
    feats = torch.randn(57, 5, generator=torch.Generator().manual_seed(0))
    dists = np.linalg.norm(feats.numpy()[:, None] - feats.numpy()[None], axis=-1)
    expected = np.sort(dists, axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(knn_radii(feats, k=3).numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(knn_radii(feats, k=3, chunk_size=7).numpy(), knn_radii(feats, k=3).numpy())


def test_hand_computed_line():
    # Real points 0..9 on a line: with k = 1 every radius is 1, the real manifold is [-1, 10].
    real = torch.arange(10, dtype=torch.float32)[:, None]
    fake = torch.tensor([[0.5], [9.5], [10.5], [30.0]])
    assert knn_radii(real, k=1).tolist() == [1.0] * 10
    # Fake radii (k = 1): 9.0, 1.0, 1.0, 19.5 -> reals within 9 of 0.5 (0..9) are all covered.
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)  # 0.5 and 9.5 inside, 10.5 and 30 outside
    assert recall == pytest.approx(1.0)
    # Without 0.5 the fake radii are 1.0 (9.5), 1.0 (10.5), 19.5 (30): only real 9 is covered.
    assert fraction_in_manifold(real, fake[1:], knn_radii(fake[1:], k=1)) == pytest.approx(0.1)


def test_set_against_itself_is_one_even_with_duplicates():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    feats = torch.cat([feats, feats[:10], feats[:10], feats[:10], feats[:10]])  # 5 copies of 10 points
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_and_recall_fall_as_the_fake_set_shifts():
    generator = torch.Generator().manual_seed(2)
    real = torch.randn(500, 8, generator=generator)
    fake_base = torch.randn(500, 8, generator=generator)
    shifts = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    results = [precision_recall(real, fake_base + torch.tensor([s] + [0.0] * 7), k=3) for s in shifts]
    precisions = [p for p, _ in results]
    recalls = [r for _, r in results]
    assert precisions[0] > 0.6 and recalls[0] > 0.6  # same distribution: most points covered
    assert all(a > b for a, b in zip(precisions, precisions[1:])), precisions
    # Recall is noisier for small shifts (both manifolds are wide in 8-D); it must fall overall.
    assert recalls[0] > recalls[3] > recalls[4] > recalls[5], recalls
    assert precisions[-1] < 0.05 and recalls[-1] < 0.05


def test_narrow_fake_set_has_high_precision_low_recall():
    # Mode collapse: samples all near the data centre are realistic (precision) but cover little (recall).
    generator = torch.Generator().manual_seed(3)
    real = torch.randn(500, 4, generator=generator)
    fake = 0.2 * torch.randn(500, 4, generator=generator)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert recall < 0.3


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature dims differ"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(torch.randn(3, 2), k=3)

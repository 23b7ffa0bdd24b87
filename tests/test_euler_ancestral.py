"""Euler ancestral (samplers/euler_ancestral.py) on Gaussian data, where the exact denoiser is known:
eta 0 is DDIM to float precision, eta 1 draws the data distribution, samples do not depend on the
batch, and the pipeline lists it for gaussian models only."""

from __future__ import annotations

import math

import pytest
import torch

from ditkit.diffusion import make_schedule, space_timesteps
from ditkit.registry import SAMPLERS
from ditkit.samplers.euler_ancestral import euler_ancestral
from ditkit.samplers.gaussian import ddim, ddpm

MU, STD = 0.3, 0.5  # data N(MU, STD^2) per dimension


class Pred:
    def __init__(self, x0: torch.Tensor, eps: torch.Tensor) -> None:
        self.x0, self.eps, self.var_frac = x0, eps, None


def exact_denoiser(abar_table: torch.Tensor):
    """E[x0 | x_t] for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with x0 ~ N(MU, STD^2)."""

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> Pred:
        a = abar_table[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        var = a * STD**2 + (1 - a)
        x0 = MU + STD**2 * a.sqrt() * (x_t - a.sqrt() * MU) / var
        return Pred(x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt())

    return fn


@pytest.fixture(scope="module")
def problem():
    abar = make_schedule("cosine", 1000).alphas_cumprod
    return abar, exact_denoiser(abar.double())


def test_eta_zero_is_ddim(problem):
    abar, denoiser = problem
    x_T = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = space_timesteps(1000, 25)
    ours = euler_ancestral(denoiser, x_T, abar, ts, eta=0.0)
    theirs = ddim(denoiser, x_T, abar, ts, eta=0.0)
    torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


def test_eta_one_is_ddpm_and_draws_the_data_distribution(problem):
    abar, denoiser = problem
    x_T = torch.randn(40_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = space_timesteps(1000, 100)
    x0 = euler_ancestral(denoiser, x_T, abar, ts, generator=torch.Generator().manual_seed(2))
    # the full ancestral step in the VE view is the DDPM posterior step (fixed small variance)
    torch.testing.assert_close(x0, ddpm(denoiser, x_T, abar, ts, generator=torch.Generator().manual_seed(2)))
    deterministic = euler_ancestral(denoiser, x_T, abar, ts, eta=0.0)
    assert (x0 - deterministic).abs().mean() > 0.05  # the ancestral noise really is added
    fine = euler_ancestral(denoiser, x_T, abar, space_timesteps(1000, 1000), generator=torch.Generator().manual_seed(2))
    assert abs(fine.mean().item() - MU) < 0.01 and abs(fine.std().item() - STD) < 0.005
    half = euler_ancestral(denoiser, x_T, abar, ts, eta=0.5, generator=torch.Generator().manual_seed(2))
    assert 0 < (half - deterministic).abs().mean() < (x0 - deterministic).abs().mean()


def test_per_sample_generators_make_samples_independent_of_the_batch(problem):
    abar, denoiser = problem
    ts = space_timesteps(1000, 10)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    x_T = torch.stack([torch.randn(3, generator=g) for g in gens([5, 6, 7])]).double()
    batch = euler_ancestral(denoiser, x_T, abar, ts, generator=gens([5, 6, 7]))
    alone = euler_ancestral(denoiser, x_T[1:2], abar, ts, generator=gens([6]))
    torch.testing.assert_close(batch[1:2], alone)
    steps = []
    euler_ancestral(denoiser, x_T, abar, ts, generator=gens([5, 6, 7]), callback=lambda i, x, x0: steps.append(i))
    assert steps == list(range(10))
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_ancestral(denoiser, x_T, abar, [0, 10])


def test_registered_for_gaussian_models():
    entry = SAMPLERS.get("euler_a", family="gaussian")
    assert entry.obj is euler_ancestral and "Euler ancestral" in entry.summary
    assert "euler_a" not in SAMPLERS.names(family="flow")
    assert math.isfinite(len(SAMPLERS))

"""Schedules and conversions against closed forms (ditkit.diffusion.schedules)."""

import math

import pytest
import torch

from ditkit.diffusion import schedules as S


def test_linear_betas_and_named_rescaling():
    betas = S.linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # improved-DDPM: the named schedule rescales the end points by 1000 / T
    half = S.make_schedule("linear", 500).betas
    assert half[0].item() == pytest.approx(2e-4) and half[-1].item() == pytest.approx(0.04)
    assert torch.equal(S.make_schedule("linear", 1000).betas, betas)


def test_cosine_betas_closed_form():
    T, s = 1000, 0.008
    betas = S.cosine_betas(T)
    assert betas.dtype == torch.float64 and float(betas.max()) <= 0.999
    assert float(betas[-1]) == pytest.approx(0.999)  # the last beta is clipped
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731 (Nichol & Dhariwal eq. 17)
    abar = torch.cumprod(1 - betas, 0)
    for t in (0, 10, 500, 900):  # unclipped region: abar_t = f(t + 1) / f(0)
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_tables_against_gaussian_conditioning(name):
    sch = S.make_schedule(name, 1000)
    betas = sch.betas
    assert torch.allclose(sch.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-12, atol=0)
    assert sch.alphas_cumprod_prev[0] == 1 and torch.equal(sch.alphas_cumprod_prev[1:], sch.alphas_cumprod[:-1])
    # Independent derivation of q(x_{t-1} | x_t, x0) by conditioning the joint Gaussian:
    # x_{t-1} = sqrt(abar_prev) x0 + sqrt(P) e1 with P = 1 - abar_prev; x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e2.
    alpha, abar, abar_prev = 1 - betas, sch.alphas_cumprod, sch.alphas_cumprod_prev
    P = 1 - abar_prev
    gain = alpha.sqrt() * P / (1 - abar)  # Cov(x_{t-1}, x_t) / Var(x_t)
    assert torch.allclose(sch.posterior_mean_coef2, gain, rtol=1e-10)
    assert torch.allclose(sch.posterior_mean_coef1, abar_prev.sqrt() - gain * abar.sqrt(), rtol=1e-8, atol=1e-12)
    assert torch.allclose(sch.posterior_variance, P - alpha * P**2 / (1 - abar), rtol=1e-8, atol=1e-15)
    assert sch.posterior_variance[0] == 0
    clipped = sch.posterior_log_variance_clipped
    assert clipped[0] == clipped[1] and torch.allclose(clipped[1:], sch.posterior_variance[1:].log())


def test_prediction_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    abar = torch.rand(5, 1, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = S.v_from_x0_eps(x0, eps, abar)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)  # Salimans & Ho 2022
    assert torch.allclose(S.x0_from_eps(x_t, eps, abar), x0)
    assert torch.allclose(S.eps_from_x0(x_t, x0, abar), eps)
    assert torch.allclose(S.x0_from_v(x_t, v, abar), x0)
    assert torch.allclose(S.eps_from_v(x_t, v, abar), eps)
    for kind in S.PREDICTIONS:
        target = S.prediction_target(x0, eps, abar, kind)
        got_x0, got_eps = S.x0_eps_from_prediction(target, x_t, abar, kind)
        assert torch.allclose(got_x0, x0) and torch.allclose(got_eps, eps), kind
    with pytest.raises(ValueError, match="unknown prediction"):
        S.prediction_target(x0, eps, abar, "score")


def test_v_is_the_angular_velocity():
    # With alpha = cos(phi), sigma = sin(phi): v = d x_phi / d phi (Salimans & Ho 2022, Sec. 4).
    x0, eps = torch.randn(2, 8, dtype=torch.float64)
    phi, h = 0.7, 1e-6
    x_at = lambda p: math.cos(p) * x0 + math.sin(p) * eps  # noqa: E731
    finite_difference = (x_at(phi + h) - x_at(phi - h)) / (2 * h)
    assert torch.allclose(S.v_from_x0_eps(x0, eps, math.cos(phi) ** 2), finite_difference, atol=1e-8)


def test_space_timesteps():
    ts = S.space_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert set(a - b for a, b in zip(ts, ts[1:])) <= {4, 5}  # stride 999/249 = 4.012
    assert ts[-5:] == [16, 12, 8, 4, 0]
    assert S.space_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert S.space_timesteps(1000, 1) == [999]
    assert S.space_timesteps(10, 4) == [9, 6, 3, 0]
    quad = S.space_timesteps(1000, 25, spacing="quadratic")
    assert len(quad) == 25 and quad[0] == 999 and quad[-1] == 0
    assert quad[-2] - quad[-1] < quad[0] - quad[1]  # denser near the data
    assert len(S.space_timesteps(1000, 500, spacing="quadratic")) == 500
    with pytest.raises(ValueError, match="num_steps"):
        S.space_timesteps(100, 101)
    with pytest.raises(ValueError, match="spacing"):
        S.space_timesteps(100, 10, spacing="log")


def test_flow_time_sampling():
    g = torch.Generator().manual_seed(0)
    t = S.sample_flow_time(20000, "uniform", generator=g)
    assert t.dtype == torch.float32 and 0 <= float(t.min()) and float(t.max()) <= 1
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
    t = S.sample_flow_time(20000, "logit_normal", logit_mean=0.5, logit_std=0.8, generator=g)
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.03) and float(logit.std()) == pytest.approx(0.8, abs=0.03)
    a = S.sample_flow_time(8, "logit_normal", generator=torch.Generator().manual_seed(3))
    b = S.sample_flow_time(8, "logit_normal", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="logit_normal"):
        S.sample_flow_time(4, "beta")


def test_timestep_indices_and_bad_inputs():
    t = S.sample_timestep_indices(5000, 1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) == 999 and int(t.min()) == 0
    with pytest.raises(ValueError, match="unknown schedule"):
        S.make_schedule("sigmoid", 1000)
    with pytest.raises(ValueError, match="betas"):
        S.GaussianSchedule.from_betas(torch.tensor([0.1, 1.5]))

"""Samplers against exact maths (ditkit.samplers).

For Gaussian data x0 ~ N(mu, Sigma) the optimal denoiser has a closed form: if
x_t = a x0 + s eps then E[x0 | x_t] = mu + a Sigma (a^2 Sigma + s^2 I)^-1 (x_t - a mu). Plugged into a
sampler it must reproduce mu and Sigma; deterministic samplers must also converge to the exact
probability-flow map at their order. Data: 4 dims shaped (N, 1, 2, 2), eigenvalues of Sigma
0.08..0.50, float64.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from ditkit.diffusion import make_schedule, space_timesteps
from ditkit.samplers import (
    classifier_free_guidance,
    ddim,
    ddpm,
    dpm_solver_pp_2m,
    euler,
    flow_timesteps,
    heun,
    randn,
)

DIM, SHAPE = 4, (1, 2, 2)
MU = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
_A = torch.tensor(
    [[0.6, 0.2, 0.0, 0.1], [0.0, 0.4, 0.1, 0.0], [0.1, 0.0, 0.3, 0.2], [0.0, 0.1, 0.0, 0.5]], dtype=torch.float64
)
SIGMA = _A @ _A.T
ALPHAS_CUMPROD = make_schedule("linear", 1000).alphas_cumprod


def _posterior_mean(x_t, signal, noise_std, mu=MU, sigma=SIGMA):
    """E[x0 | x_t] for x_t = signal x0 + noise_std eps, x0 ~ N(mu, sigma); x_t (N, DIM)."""
    gain = signal * sigma @ torch.linalg.inv(signal**2 * sigma + noise_std**2 * torch.eye(DIM, dtype=sigma.dtype))
    return mu + (x_t - signal * mu) @ gain.T


def gaussian_denoiser(x, t_index):
    t = int(t_index[0])
    assert t_index.dtype == torch.int64 and bool((t_index == t).all())
    abar = ALPHAS_CUMPROD[t].item()
    x_flat = x.reshape(len(x), DIM)
    x0 = _posterior_mean(x_flat, math.sqrt(abar), math.sqrt(1 - abar))
    eps = (x_flat - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
    return SimpleNamespace(x0=x0.reshape(x.shape), eps=eps.reshape(x.shape), var_frac=None)


def flow_velocity(x, t):
    time = float(t[0])
    x_flat = x.reshape(len(x), DIM)
    x0 = _posterior_mean(x_flat, 1 - time, time)
    eps = (x_flat - (1 - time) * x0) / time
    return (eps - x0).reshape(x.shape)


def _noise(n, seed):
    return randn((n, *SHAPE), torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_moments(samples, mean_tol, cov_tol, mu=MU, sigma=SIGMA):
    flat = samples.reshape(len(samples), DIM)
    mean_err = (flat.mean(0) - mu).abs().max().item()
    cov_err = (torch.cov(flat.T) - sigma).abs().max().item()
    assert mean_err < mean_tol and cov_err < cov_tol, f"mean err {mean_err:.4f}, cov err {cov_err:.4f}"


# Stated tolerances (max abs error over entries; N = 10000, sampling noise ~0.01 for the covariance);
# measured errors in the comments.
def test_ddpm_250_steps_matches_data():
    g = torch.Generator().manual_seed(1)
    x = ddpm(gaussian_denoiser, _noise(10000, 0), ALPHAS_CUMPROD, space_timesteps(1000, 250), generator=g)
    _assert_moments(x, 0.03, 0.04)  # measured 0.013 / 0.019


def test_ddim_25_steps_matches_data():
    x = ddim(gaussian_denoiser, _noise(10000, 0), ALPHAS_CUMPROD, space_timesteps(1000, 25, "quadratic"))
    _assert_moments(x, 0.03, 0.08)  # first order: measured 0.006 / 0.049 (uniform spacing: 0.071)


def test_dpm_solver_pp_2m_25_steps_matches_data():
    x = dpm_solver_pp_2m(gaussian_denoiser, _noise(10000, 0), ALPHAS_CUMPROD, space_timesteps(1000, 25, "quadratic"))
    _assert_moments(x, 0.03, 0.03)  # measured 0.006 / 0.011 (uniform spacing: 0.12, see space_timesteps)


def test_heun_25_steps_matches_data():
    _assert_moments(heun(flow_velocity, _noise(10000, 0), flow_timesteps(25)), 0.03, 0.03)  # measured 0.007 / 0.004


def test_euler_50_steps_matches_data():
    _assert_moments(euler(flow_velocity, _noise(10000, 0), flow_timesteps(50)), 0.03, 0.05)  # measured 0.007 / 0.020


def test_ddpm_learned_variance_is_exact_at_few_steps():
    # Diagonal Sigma: the true reverse step x_next | x_t is Gaussian with per-dimension variance
    # posterior_var + coef1^2 Var[x0 | x_t]; given as var_frac, 10 ancestral steps are exact.
    mu, var = MU, torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=torch.float64)
    timesteps = space_timesteps(1000, 10)
    abar_next = {t: ALPHAS_CUMPROD[n].item() for t, n in zip(timesteps, timesteps[1:])}

    def denoiser(x, t_index, learned=True):
        t = int(t_index[0])
        a, x_flat = ALPHAS_CUMPROD[t].item(), x.reshape(len(x), DIM)
        x0 = _posterior_mean(x_flat, math.sqrt(a), math.sqrt(1 - a), mu, torch.diag(var))
        eps = (x_flat - math.sqrt(a) * x0) / math.sqrt(1 - a)
        frac = None
        if learned and t in abar_next:
            an = abar_next[t]
            beta = 1 - a / an
            post_var, coef1 = beta * (1 - an) / (1 - a), beta * math.sqrt(an) / (1 - a)
            true_var = post_var + coef1**2 * var * (1 - a) / (a * var + 1 - a)
            f = (true_var.log() - math.log(post_var)) / (math.log(beta) - math.log(post_var))
            frac = f.expand_as(x_flat).reshape(x.shape)
        return SimpleNamespace(x0=x0.reshape(x.shape), eps=eps.reshape(x.shape), var_frac=frac)

    g = torch.Generator().manual_seed(1)
    x = ddpm(denoiser, _noise(10000, 0), ALPHAS_CUMPROD, timesteps, generator=g)
    _assert_moments(x, 0.04, 0.04, mu, torch.diag(var))  # measured 0.014 / 0.013
    fixed = ddpm(lambda x, t: denoiser(x, t, learned=False), _noise(10000, 0), ALPHAS_CUMPROD, timesteps, generator=g)
    with pytest.raises(AssertionError):  # the fixed posterior variance is far off at 10 steps (0.49)
        _assert_moments(fixed, 0.04, 0.2, mu, torch.diag(var))


def _exact_vp_endpoint(x_T):
    """Probability-flow map from x at t = T-1 to x0 (linear; per eigen-direction a quantile map)."""
    ev, U = torch.linalg.eigh(SIGMA)
    a = ALPHAS_CUMPROD[999].item()
    z = (x_T.reshape(len(x_T), DIM) - math.sqrt(a) * MU) @ U / torch.sqrt(a * ev + 1 - a)
    return (MU + (z * ev.sqrt()) @ U.T).reshape(x_T.shape)


def _exact_flow_endpoint(x_1):
    ev, U = torch.linalg.eigh(SIGMA)
    return (MU + ((x_1.reshape(len(x_1), DIM) @ U) * ev.sqrt()) @ U.T).reshape(x_1.shape)


def _uniform(n):
    return space_timesteps(1000, n)


@pytest.mark.parametrize(
    "name,run,exact,low,high",
    [
        ("ddim", lambda x, n: ddim(gaussian_denoiser, x, ALPHAS_CUMPROD, _uniform(n)), _exact_vp_endpoint, 1.6, 2.5),
        (
            "dpm++2m",
            lambda x, n: dpm_solver_pp_2m(gaussian_denoiser, x, ALPHAS_CUMPROD, _uniform(n)),
            _exact_vp_endpoint, 3.2, 6.0,
        ),
        ("euler", lambda x, n: euler(flow_velocity, x, flow_timesteps(n)), _exact_flow_endpoint, 1.6, 2.5),
        ("heun", lambda x, n: heun(flow_velocity, x, flow_timesteps(n)), _exact_flow_endpoint, 3.2, 6.0),
    ],
)
def test_order_of_convergence_to_the_exact_flow(name, run, exact, low, high):
    # doubling the steps divides the error by ~2 (first order) or ~4 (second order)
    x = _noise(500, 3)
    target = exact(x)
    err = [(run(x, n) - target).abs().max().item() for n in (50, 100)]
    assert low < err[0] / err[1] < high, f"{name}: errors {err}"


def test_generator_determinism():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return ddpm(gaussian_denoiser, _noise(8, 0), ALPHAS_CUMPROD, space_timesteps(1000, 20), generator=g)

    assert torch.equal(run(5), run(5)) and not torch.allclose(run(5), run(6))


@pytest.mark.parametrize(
    "sample",
    [
        lambda x, g: ddpm(gaussian_denoiser, x, ALPHAS_CUMPROD, space_timesteps(1000, 20), generator=g),
        lambda x, g: ddim(gaussian_denoiser, x, ALPHAS_CUMPROD, space_timesteps(1000, 20), eta=1.0, generator=g),
    ],
)
def test_per_sample_generators_batch_equals_one_at_a_time(sample):
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    seeds = [10, 11, 12]
    g = gens(seeds)
    batch = sample(randn((3, *SHAPE), g, dtype=torch.float64), g)
    for i, seed in enumerate(seeds):
        (g1,) = gens([seed])
        single = sample(randn((1, *SHAPE), [g1], dtype=torch.float64), [g1])
        assert torch.allclose(batch[i : i + 1], single, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])


def test_noise_helper():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(0)), torch.randn((2, 3), generator=g))
    assert randn((2, 3), None, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="one per sample"):
        randn((3, 2), [torch.Generator()])


class _CountingModel:
    """Output channel c = (c + 1) * x + y (so cond and uncond differ); records each call."""

    def __init__(self, out_channels):
        self.out_channels, self.calls = out_channels, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return torch.cat([(c + 1) * x + y.float().reshape(-1, 1, 1, 1) for c in range(self.out_channels)], 1)


def test_classifier_free_guidance():
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, y = torch.full((3,), 7.0), torch.tensor([0, 1, 2])
    null = 10
    model = _CountingModel(out_channels=4)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null))
    model.calls.clear()
    assert torch.allclose(classifier_free_guidance(model, y, 1.0, null)(x, t), cond, rtol=0, atol=1e-12)
    guided = classifier_free_guidance(model, y, 4.0, null)(x, t)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond))
    assert len(model.calls) == 2 and all(n == 6 for n, _ in model.calls)  # one doubled forward per call
    assert torch.equal(model.calls[-1][1], torch.tensor([0, 1, 2, null, null, null]))
    partial = classifier_free_guidance(model, y, 4.0, null, guide_channels=3)(x, t)
    assert torch.allclose(partial[:, :3], guided[:, :3]) and torch.allclose(partial[:, 3:], cond[:, 3:])
    with pytest.raises(ValueError, match="guide_channels"):
        classifier_free_guidance(model, y, 4.0, null, guide_channels=5)(x, t)


def test_callbacks_and_input_checks():
    steps = []
    ddim(gaussian_denoiser, _noise(2, 0), ALPHAS_CUMPROD, [999, 500, 0], callback=lambda i, x, x0: steps.append(i))
    heun(flow_velocity, _noise(2, 0), flow_timesteps(4), callback=lambda i, x, x0: steps.append(i))
    assert steps == [0, 1, 2, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddpm(gaussian_denoiser, _noise(2, 0), ALPHAS_CUMPROD, [0, 500, 999])
    with pytest.raises(ValueError, match="lie in"):
        ddim(gaussian_denoiser, _noise(2, 0), ALPHAS_CUMPROD, [1000, 0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler(flow_velocity, _noise(2, 0), [0.0, 1.0])


def test_flow_timesteps_shift():
    ts = flow_timesteps(4)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = flow_timesteps(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and shifted[2].item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)

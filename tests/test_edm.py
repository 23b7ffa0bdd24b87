"""EDM (Karras et al. 2022): the objective's preconditioning and loss, and the Karras-sigma
Euler / Heun samplers against closed forms on Gaussian data.

For data x0 ~ N(mu, Sigma) and x_sigma = x0 + sigma eps the exact denoiser is
D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), and the probability-flow ODE
dx/dsigma = (x - D) / sigma maps x at sigma_max to x0 exactly by scaling each eigen-direction of
Sigma (eigenvalue ev) by sqrt(ev / (ev + sigma_max^2)). Data: 4 dims shaped (N, 1, 2, 2), float64.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from ditkit.diffusion import schedules
from ditkit.diffusion.edm import EDM, edm_network_time
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES, SAMPLERS
from ditkit.samplers.edm import edm_euler, edm_heun, karras_sigmas
from ditkit.samplers.noise import randn

DIM, SHAPE = 4, (1, 2, 2)
MU = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
_A = torch.tensor(
    [[0.6, 0.2, 0.0, 0.1], [0.0, 0.4, 0.1, 0.0], [0.1, 0.0, 0.3, 0.2], [0.0, 0.1, 0.0, 0.5]], dtype=torch.float64
)
COV = _A @ _A.T
SIGMA_MAX = 80.0


def exact_denoiser(x, sigma):
    """D(x; sigma) for x0 ~ N(MU, COV); sigma (B,) all equal."""
    s = float(sigma[0])
    assert bool((sigma == s).all())
    gain = COV @ torch.linalg.inv(COV + s**2 * torch.eye(DIM, dtype=torch.float64))
    return (MU + (x.reshape(len(x), DIM) - MU) @ gain.T).reshape(x.shape)


def exact_endpoint(x, sigma_max=SIGMA_MAX):
    ev, U = torch.linalg.eigh(COV)
    z = ((x.reshape(len(x), DIM) - MU) @ U) * torch.sqrt(ev / (ev + sigma_max**2))
    return (MU + z @ U.T).reshape(x.shape)


def _start(n, seed, sigma_max=SIGMA_MAX):
    return randn((n, *SHAPE), torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma_max


def _rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def _assert_moments(samples, mean_tol, cov_tol):
    flat = samples.reshape(len(samples), DIM)
    mean_err = (flat.mean(0) - MU).abs().max().item()
    cov_err = (torch.cov(flat.T) - COV).abs().max().item()
    assert mean_err < mean_tol and cov_err < cov_tol, f"mean err {mean_err:.4f}, cov err {cov_err:.4f}"


# ---- the sigma grid ------------------------------------------------------------------------------


def test_karras_sigmas_hand_values_and_the_objectives_copy():
    # rho = 2, sigma 1..16: (4 + i/2 (1 - 4))^2 = 16, 6.25, 1, then 0
    assert karras_sigmas(3, 1.0, 16.0, rho=2.0).tolist() == [16.0, 6.25, 1.0, 0.0]
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    s = karras_sigmas(18, 0.002, 80.0)
    assert s.dtype == torch.float64 and s.shape == (19,) and s[-1] == 0
    assert math.isclose(s[0].item(), 80.0) and math.isclose(s[-2].item(), 0.002, rel_tol=1e-12)
    assert bool((s[:-1] > s[1:]).all())
    # diffusion/ cannot import samplers/, so it keeps its own copy: the same numbers, bit for bit
    for args in [(1, 0.002, 80.0), (18, 0.002, 80.0, 7.0), (5, 0.1, 10.0, 3.0)]:
        assert torch.equal(karras_sigmas(*args), schedules.karras_sigmas(*args))
    with pytest.raises(ValueError):
        karras_sigmas(0, 0.002, 80.0)
    with pytest.raises(ValueError):
        karras_sigmas(4, 10.0, 1.0)


# ---- samplers against the exact ODE ------------------------------------------------------------


def test_deterministic_heun_32_steps_matches_the_exact_ode():
    x = _start(500, 3)
    out = edm_heun(exact_denoiser, x, karras_sigmas(32, 0.002, SIGMA_MAX))
    assert _rms(out, exact_endpoint(x)) < 0.015  # measured 0.0078 (data std 0.3..0.7)


@pytest.mark.parametrize("sampler,steps,low,high", [(edm_euler, 32, 1.6, 2.5), (edm_heun, 16, 3.2, 6.0)])
def test_order_of_convergence(sampler, steps, low, high):
    # doubling the steps divides the error by ~2 (Euler, first order) or ~4 (Heun); measured 1.99, 4.6
    x = _start(500, 3)
    target = exact_endpoint(x)
    err = [_rms(sampler(exact_denoiser, x, karras_sigmas(n, 0.002, SIGMA_MAX)), target) for n in (steps, 2 * steps)]
    assert low < err[0] / err[1] < high, err


def test_churn_keeps_the_data_distribution_and_uses_the_generator():
    g = torch.Generator().manual_seed(1)
    sigmas = karras_sigmas(64, 0.002, SIGMA_MAX)
    x = edm_heun(exact_denoiser, _start(10000, 0), sigmas, generator=g, S_churn=40.0)
    _assert_moments(x, 0.03, 0.03)  # measured 0.004 / 0.013 (32 steps, gamma = sqrt2 - 1 each step: 0.017 / 0.045)
    deterministic = edm_heun(exact_denoiser, _start(10000, 0), sigmas)
    assert _rms(x, deterministic) > 0.05  # the churn noise changed the samples


def test_deterministic_samplers_draw_nothing_and_churn_window_applies():
    x, sigmas = _start(8, 0), karras_sigmas(10, 0.002, SIGMA_MAX)
    base = edm_heun(exact_denoiser, x, sigmas)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(edm_heun(exact_denoiser, x, sigmas, generator=g), base)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    # churn outside [S_tmin, S_tmax] is off: a window below sigma_min changes nothing
    assert torch.equal(edm_heun(exact_denoiser, x, sigmas, generator=g, S_churn=40.0, S_tmax=1e-4), base)
    a = edm_euler(exact_denoiser, x, sigmas, generator=torch.Generator().manual_seed(5), S_churn=10.0, S_tmin=0.05, S_tmax=50)
    b = edm_euler(exact_denoiser, x, sigmas, generator=torch.Generator().manual_seed(5), S_churn=10.0, S_tmin=0.05, S_tmax=50)
    assert torch.equal(a, b) and not torch.equal(a, edm_euler(exact_denoiser, x, sigmas))


def test_churn_noise_level_matches_algorithm_2():
    # grid [2, 1, 0] is N = 2 steps: gamma = min(S_churn / N, sqrt2 - 1) = 0.125 on the first, so the
    # denoiser first sees x_hat = x + sqrt(sigma_hat^2 - 2^2) S_noise n at sigma_hat = 2.25 (Alg. 2, lines 4-6)
    seen = []

    def zero(x, sigma):
        seen.append((x.clone(), float(sigma[0])))
        return torch.zeros_like(x)

    x = torch.ones(1, *SHAPE, dtype=torch.float64)
    edm_euler(zero, x, [2.0, 1.0, 0.0], generator=torch.Generator().manual_seed(0), S_churn=0.25, S_noise=0.5)
    sigma_hat = 2.0 * 1.125
    g = torch.Generator().manual_seed(0)
    n1, n2 = (torch.randn((1, *SHAPE), generator=g, dtype=torch.float64) for _ in range(2))
    x_hat = x + math.sqrt(sigma_hat**2 - 4.0) * 0.5 * n1
    assert math.isclose(seen[0][1], sigma_hat) and torch.allclose(seen[0][0], x_hat)
    # Euler from sigma_hat to 1 with D = 0: x_hat + (1 - 2.25) x_hat / 2.25; then churn again at sigma = 1
    assert math.isclose(seen[1][1], 1.125)
    assert torch.allclose(seen[1][0], x_hat / 2.25 + math.sqrt(1.125**2 - 1.0) * 0.5 * n2)


def test_per_sample_generators_batch_equals_one_at_a_time():
    seeds, sigmas = [10, 11, 12], karras_sigmas(8, 0.002, SIGMA_MAX)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    g = gens()
    batch = edm_heun(exact_denoiser, randn((3, *SHAPE), g, dtype=torch.float64) * 80, sigmas, generator=g, S_churn=5.0)
    for i, seed in enumerate(seeds):
        g1 = [torch.Generator().manual_seed(seed)]
        single = edm_heun(exact_denoiser, randn((1, *SHAPE), g1, dtype=torch.float64) * 80, sigmas, generator=g1, S_churn=5.0)
        assert torch.allclose(batch[i : i + 1], single, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])


def test_callbacks_calls_and_input_checks():
    steps, calls, seen = [], [], []
    sigmas = karras_sigmas(5, 0.002, SIGMA_MAX)

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return exact_denoiser(x, sigma)

    x = _start(4, 0)
    out = edm_heun(counting, x, sigmas, callback=lambda i, x, x0: steps.append((i, x.clone(), x0)))
    assert [i for i, _, _ in steps] == [0, 1, 2, 3, 4] and torch.equal(steps[-1][1], out)
    assert len(calls) == 2 * 5 - 1  # no corrector on the last step (to sigma = 0)
    assert torch.allclose(steps[0][2], exact_denoiser(x, torch.full((4,), 80.0, dtype=torch.float64)))
    edm_euler(lambda x, s: seen.append(1) or exact_denoiser(x, s), x, sigmas)
    assert len(seen) == 5
    for bad in ([80.0, 1.0], [1.0, 2.0, 0.0], [5.0]):
        with pytest.raises(ValueError, match="decreasing"):
            edm_euler(exact_denoiser, x, bad)
    with pytest.raises(ValueError):
        edm_heun(exact_denoiser, x, sigmas, S_churn=-1.0)


def test_registered():
    assert {"edm_euler", "edm_heun"} <= set(SAMPLERS.names(family="edm"))
    assert SAMPLERS.get("edm_heun", family="edm").obj is edm_heun
    assert "S_churn" in SAMPLERS.get("edm_euler").options
    entry = OBJECTIVES.get("edm", family="edm")
    assert entry.obj is EDM and entry.modality == "image"


# ---- the objective ------------------------------------------------------------------------------


def test_preconditioning_and_weight_hand_values():
    edm = EDM(sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(torch.tensor([0.5, 0.0], dtype=torch.float64).clamp(min=1e-300))
    # sigma = sigma_data = 0.5: c_skip 1/2, c_out 0.25 / sqrt(0.5), c_in 1 / sqrt(0.5), c_noise ln(0.5)/4
    assert torch.allclose(c_skip[0], torch.tensor(0.5, dtype=torch.float64))
    assert math.isclose(c_out[0].item(), 0.25 / math.sqrt(0.5)) and math.isclose(c_in[0].item(), 1 / math.sqrt(0.5))
    assert math.isclose(c_noise[0].item(), math.log(0.5) / 4)
    assert math.isclose(c_skip[1].item(), 1.0) and c_out[1].item() < 1e-299  # sigma -> 0: D(x) = x
    # lambda(0.5) = (0.25 + 0.25) / 0.0625 = 8 = 1 / c_out^2; lambda(2) = 4.25 / 1
    w = edm.loss_weight(torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([8.0, 4.25], dtype=torch.float64))
    assert math.isclose(w[0].item(), 1 / c_out[0].item() ** 2)


def test_network_time_is_the_documented_affine_map_in_range():
    sigma = torch.tensor([1.0, 0.002, 80.0, math.exp(-6.4)], dtype=torch.float64)
    t = edm_network_time(sigma)
    assert torch.allclose(t, 62.5 * sigma.log() + 400)
    assert math.isclose(t[0].item(), 400.0) and 0 < t[1].item() < 15 and 670 < t[2].item() < 680
    assert abs(t[3].item()) < 1e-9


def test_target_has_unit_variance_for_data_of_std_sigma_data():
    # The preconditioning makes the network's input and target unit-variance (Karras et al. 2022, App. B.6).
    edm, g = EDM(sigma_data=0.5), torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(40000, generator=g, dtype=torch.float64)
    noise = torch.randn(40000, generator=g, dtype=torch.float64)
    for sigma in (0.01, 0.5, 10.0):
        c_skip, c_out, c_in, _ = edm.preconditioning(torch.tensor(sigma, dtype=torch.float64))
        x = x0 + sigma * noise
        assert abs((c_in * x).var().item() - 1) < 0.03, sigma
        assert abs(((x0 - c_skip * x) / c_out).var().item() - 1) < 0.03, sigma


def _recording_model(seen, out_fn=None):
    def model(x, t, y):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x) if out_fn is None else out_fn(x, t)

    return model


def test_loss_is_lambda_weighted_denoiser_error_and_zero_for_the_ideal_output():
    edm, g = EDM(), torch.Generator().manual_seed(0)
    x0 = torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    raw = torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    seen = []
    terms = edm.loss_terms(_recording_model(seen, lambda x, t: raw), x0, None, sigma=sigma, noise=noise)
    s = sigma.reshape(-1, 1, 1, 1)
    x_sigma = x0 + s * noise
    c_skip, c_out, c_in, _ = edm.preconditioning(s)
    D = c_skip * x_sigma + c_out * raw
    expected = edm.loss_weight(sigma) * (D - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(terms["loss"], expected, rtol=1e-9)
    assert torch.allclose(terms["mse_x0"], (D - x0).pow(2).flatten(1).mean(1))
    assert torch.allclose(seen[0][0], c_in * x_sigma) and torch.allclose(seen[0][1], (62.5 * sigma.log() + 400).float())
    ideal = lambda x, t: (x0 - c_skip * x_sigma) / c_out  # noqa: E731
    assert edm.loss_terms(_recording_model([], ideal), x0, None, sigma=sigma, noise=noise)["loss"].abs().max() < 1e-20
    with pytest.raises(ValueError, match="learn_sigma=False"):
        edm.loss(lambda x, t, y: torch.cat([x, x], 1), x0, None, sigma=sigma, noise=noise)


def test_training_sigmas_are_log_normal_and_drawn_before_the_noise():
    edm = EDM(p_mean=-1.2, p_std=1.2)
    x0 = torch.zeros(20000, 1, 1, 1)
    seen = []
    edm.loss(_recording_model(seen), x0, None, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(20000, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    assert torch.allclose(seen[0][1], edm_network_time(sigma))
    c_in = 1 / (sigma**2 + 0.25).sqrt()
    assert torch.allclose(seen[0][0], c_in.reshape(-1, 1, 1, 1) * sigma.reshape(-1, 1, 1, 1) * noise, atol=1e-6)
    log_sigma = (seen[0][1] - 400) / 62.5
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03


def test_global_draws_are_the_whole_batch_draws_cut_to_rows():
    edm, x_global = EDM(), torch.randn(6, *SHAPE)
    seen = []
    edm.loss(_recording_model(seen), x_global, None, torch.Generator().manual_seed(3))
    for rows in (slice(0, 3), slice(3, 6)):
        given = edm.global_draws(x_global[rows], 6, rows, torch.Generator().manual_seed(3))
        assert set(given) == {"sigma", "noise"} and given["noise"].shape == (3, *SHAPE)
        seen_rank = []
        edm.loss(_recording_model(seen_rank), x_global[rows], None, **given)
        assert torch.equal(seen_rank[0][0], seen[0][0][rows]) and torch.equal(seen_rank[0][1], seen[0][1][rows])


def _exact_net(edm):
    """The raw network output F that makes EDM's denoiser the exact Gaussian-data denoiser."""

    def net(x_in, t):
        sigma = torch.exp((t.double() - 400) / 62.5)
        c_skip, c_out, c_in, _ = edm.preconditioning(sigma.reshape(-1, 1, 1, 1))
        x = x_in / c_in
        return (exact_denoiser(x, sigma) - c_skip * x) / c_out

    return net


def test_sample_builds_the_karras_grid_and_runs_the_sampler():
    edm = EDM(sigma_min=0.002, sigma_max=SIGMA_MAX)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    x_T = edm.prior((4, *SHAPE), gens).double()
    expected_prior = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in range(4)]) * 80
    assert torch.equal(x_T.float(), expected_prior)
    steps = []
    out = edm.sample(edm_heun, _exact_net(edm), x_T, 32, callback=lambda i, x, x0: steps.append(i))
    # the network time goes through float32, so sigma is recovered to ~1e-7 relative
    direct = edm_heun(exact_denoiser, x_T, karras_sigmas(32, 0.002, SIGMA_MAX))
    assert _rms(out, direct) < 1e-4 and _rms(out, exact_endpoint(x_T)) < 0.015
    assert steps == list(range(32))
    calls = []
    edm.sample(lambda d, x, sigmas, **kw: calls.append((sigmas, kw)) or x, None, x_T, 7, generator=gens, S_churn=1.0)
    assert torch.equal(calls[0][0], karras_sigmas(7, 0.002, SIGMA_MAX))
    assert calls[0][1] == {"generator": gens, "callback": None, "S_churn": 1.0}


def test_from_config():
    o = SimpleNamespace(sigma_min=0.01, sigma_max=40.0, sigma_data=0.6, p_mean=-1.0, p_std=1.5, loss_weighting="none")
    edm = EDM.from_config(SimpleNamespace(objective=o))
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data, edm.p_mean, edm.p_std) == (0.01, 40.0, 0.6, -1.0, 1.5)
    assert edm.family == "edm"
    for bad in (dict(sigma_min=50.0), dict(sigma_data=0.0), dict(p_std=-1.0), dict(loss_weighting="min_snr")):
        with pytest.raises(ConfigError, match="objective"):
            EDM.from_config(SimpleNamespace(objective=SimpleNamespace(**{**vars(o), **bad})))


def test_trains_a_real_dit():
    # A new DiT outputs zeros (adaLN-Zero): D = c_skip x, so the loss is lambda ||c_skip x_sigma - x0||^2;
    # a few Adam steps on four images lower it.
    from ditkit.models.dit import build_dit

    torch.manual_seed(0)
    model = build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=2, learn_sigma=False)
    edm = EDM()
    x0, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1])
    sigma, noise = torch.tensor([0.1, 0.5, 2.0, 20.0]), torch.randn(4, 1, 8, 8)
    terms = edm.loss_terms(model, x0, y, sigma=sigma, noise=noise)
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = 0.25 / (s**2 + 0.25)
    expected = edm.loss_weight(sigma) * (c_skip * (x0 + s * noise) - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)
    xb, yb = x0.repeat(8, 1, 1, 1), y.repeat(8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def eval_loss():
        with torch.no_grad():
            return edm.loss(model, xb, yb, torch.Generator().manual_seed(1)).mean().item()

    before = eval_loss()
    for _ in range(100):
        loss = edm.loss(model, xb, yb, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.75 * before  # measured 0.55 (unit-variance target: the loss starts near 1)

"""Inpainting and SDEdit (ditkit.samplers.inpaint) on data whose exact denoiser is known.

Data x0 ~ N(mu, Sigma) in 4 dims (rows (N, 4), float64); if x = a x0 + s n then
E[x0 | x] = mu + a Sigma (a^2 Sigma + s^2 I)^-1 (x - a mu) for every family (gaussian: a = sqrt(abar),
s = sqrt(1 - abar); flow: a = 1 - t, s = t; edm: a = 1, s = sigma). Dims 0 and 2 are known, 1 and 3
regenerated. The exact conditional of the unknown dims given the known is the usual Gaussian one.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from ditkit.diffusion.schedules import make_schedule, space_timesteps
from ditkit.errors import ConfigError
from ditkit.samplers.flow import euler, flow_timesteps, heun
from ditkit.samplers.gaussian import ddim, ddpm, dpm_solver_pp_2m
from ditkit.samplers.inpaint import (
    adapter_for,
    edm_adapter,
    flow_adapter,
    gaussian_adapter,
    inpaint,
    prepare_mask,
    sdedit_start,
)

D = 4
MU = torch.tensor([0.5, -1.0, 0.3, 1.0], dtype=torch.float64)
_L = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0.5, 0.3, 0.7, 0], [-0.4, 0.2, 0.3, 0.6]], dtype=torch.float64)
SIGMA = 0.5 * _L @ _L.T  # correlations 0.6-0.8 between known and unknown dims
KNOWN = torch.tensor([True, False, True, False])
MASK = (~KNOWN).to(torch.float64)  # 1 = regenerate
ABAR = make_schedule("linear", 1000).alphas_cumprod


def posterior_mean(x, a, s, sigma=SIGMA):
    """E[x0 | x] for x = a x0 + s n; x (N, D), a and s (N, 1) or floats."""
    a = torch.as_tensor(a, dtype=x.dtype).reshape(-1, 1, 1)
    s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1, 1)
    eye = torch.eye(D, dtype=x.dtype)
    gain = a * sigma @ torch.linalg.inv(a**2 * sigma + s**2 * eye)  # (N or 1, D, D)
    return MU + ((x - a[:, :, 0] * MU).unsqueeze(1) @ gain.transpose(1, 2)).squeeze(1)


def make_family(sigma=SIGMA):
    """(gaussian denoiser, flow velocity, edm denoiser) exact for N(MU, sigma)."""

    def gaussian(x, t):
        abar = ABAR[t].reshape(-1, 1)
        x0 = posterior_mean(x, abar.sqrt(), (1 - abar).sqrt(), sigma)
        return SimpleNamespace(x0=x0, eps=(x - abar.sqrt() * x0) / (1 - abar).sqrt(), var_frac=None)

    def velocity(x, t):
        t = t.reshape(-1, 1).double()
        return (x - posterior_mean(x, 1 - t, t, sigma)) / t

    def edm(x, sig):
        return posterior_mean(x, 1.0, sig.reshape(-1, 1).double(), sigma)

    return gaussian, velocity, edm


def edm_euler(denoiser, x, sigmas, *, callback=None):
    """Karras et al. 2022 Alg. 1 without churn, Euler only (a stand-in EDM sampler)."""
    for sig, sig_next in zip(sigmas[:-1], sigmas[1:]):
        level = torch.full((x.shape[0],), float(sig), dtype=x.dtype)
        x = x + (float(sig_next) - float(sig)) * (x - denoiser(x, level)) / float(sig)
    return x


def exact_conditional(image_row):
    k, u = KNOWN, ~KNOWN
    s_kk, s_uk, s_uu = SIGMA[k][:, k], SIGMA[u][:, k], SIGMA[u][:, u]
    mean = MU[u] + s_uk @ torch.linalg.solve(s_kk, image_row[k] - MU[k])
    return mean, s_uu - s_uk @ torch.linalg.solve(s_kk, s_uk.T)


def image_batch(n):
    row = torch.tensor([0.9, 0.0, -0.2, 0.0], dtype=torch.float64)  # unknown dims are ignored
    return row.expand(n, D).clone()


GAUSS, VEL, EDM = make_family()
SIGMAS = torch.cat([torch.linspace(20.0, 0.02, 30, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def run(name, n, generator, steps=20):
    """Inpaint n copies of the image with sampler ``name``; returns (output, image)."""
    image = image_batch(n)
    x_T = torch.randn(n, D, generator=generator, dtype=torch.float64)
    ts = space_timesteps(1000, steps)
    if name in ("ddpm", "ddim", "dpm_solver_pp_2m"):
        sampler = {"ddpm": ddpm, "ddim": ddim, "dpm_solver_pp_2m": dpm_solver_pp_2m}[name]
        out = inpaint(sampler, GAUSS, x_T, ABAR, ts, image=image, mask=MASK, adapter=gaussian_adapter(ABAR),
                      generator=generator)
    elif name in ("euler", "heun"):
        sampler = {"euler": euler, "heun": heun}[name]
        out = inpaint(sampler, VEL, x_T, flow_timesteps(steps), image=image, mask=MASK, adapter=flow_adapter(),
                      generator=generator)
    else:
        out = inpaint(edm_euler, EDM, SIGMAS[0] * x_T, SIGMAS, image=image, mask=MASK, adapter=edm_adapter(),
                      generator=generator)
    return out, image


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver_pp_2m", "euler", "heun", "edm_euler"])
def test_known_region_is_the_original_and_unknown_is_regenerated(name):
    out, image = run(name, 64, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, KNOWN], image[:, KNOWN])
    assert out[:, ~KNOWN].std(0).min() > 0.1  # regenerated, and differently per sample
    assert torch.isfinite(out).all()


def test_every_network_input_carries_the_noised_original():
    """At every call the known dims of the input are a q(x_t | x0) draw: their mean is sqrt(abar) x0."""
    seen = []

    def spy(x, t):
        abar = ABAR[t[0]].item()
        seen.append((x[:, KNOWN].mean(0) - math.sqrt(abar) * image[0, KNOWN]) / math.sqrt(1 - abar))
        return GAUSS(x, t)

    n = 2000
    image = image_batch(n)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(n, D, generator=g, dtype=torch.float64)
    inpaint(ddim, spy, x_T, ABAR, space_timesteps(1000, 5), image=image, mask=MASK, adapter=gaussian_adapter(ABAR),
            generator=g)
    assert len(seen) == 5
    for z in seen:  # standardised mean of n standard normals: |z| < 5 / sqrt(n)
        assert z.abs().max() < 5 / math.sqrt(n)


@pytest.mark.parametrize("name", ["ddpm", "heun"])
def test_independent_regions_give_the_exact_conditional(name):
    """With known and unknown dims independent the replacement is exact: the unknown dims follow
    their own marginal N(mu_u, Sigma_uu) (correlated within), whatever the known values."""
    global GAUSS, VEL
    block = SIGMA.clone()
    block[KNOWN.nonzero(), (~KNOWN).nonzero().T] = 0
    block[(~KNOWN).nonzero(), KNOWN.nonzero().T] = 0
    block[1, 3] = block[3, 1] = 0.15  # the unknown dims stay correlated
    saved = GAUSS, VEL
    GAUSS, VEL, _ = make_family(block)
    try:
        out, _ = run(name, 3000, torch.Generator().manual_seed(2), steps={"ddpm": 250, "heun": 40}[name])
    finally:
        GAUSS, VEL = saved
    u = out[:, ~KNOWN]
    target_cov = block[~KNOWN][:, ~KNOWN]
    se = (target_cov.diagonal() / len(u)).sqrt()
    assert ((u.mean(0) - MU[~KNOWN]).abs() < 4 * se).all(), u.mean(0)
    assert (torch.cov(u.T) - target_cov).abs().max() < 0.04, torch.cov(u.T)


def repaint_reference(n, steps, generator):
    """RePaint Alg. 1 (Lugmayr et al. 2022) without resampling, written out directly: a DDPM step
    on the unknown dims, the known dims drawn from q(x_{t-1} | x0), on the respaced chain."""
    image = image_batch(n)
    ts = space_timesteps(1000, steps)
    abar = [ABAR[t].item() for t in ts] + [1.0]
    x = torch.randn(n, D, generator=generator, dtype=torch.float64)
    x = torch.where(KNOWN, math.sqrt(abar[0]) * image + math.sqrt(1 - abar[0]) * torch.randn(n, D, generator=generator,
                                                                                           dtype=torch.float64), x)
    for i, t in enumerate(ts):
        a, a_next = abar[i], abar[i + 1]
        x0 = GAUSS(x, torch.full((n,), t)).x0
        beta = 1 - a / a_next
        mean = beta * math.sqrt(a_next) / (1 - a) * x0 + (1 - a_next) * math.sqrt(1 - beta) / (1 - a) * x
        std = math.sqrt(beta * (1 - a_next) / (1 - a)) if i < len(ts) - 1 else 0.0
        unknown = mean + std * torch.randn(n, D, generator=generator, dtype=torch.float64)
        known = math.sqrt(a_next) * image + math.sqrt(1 - a_next) * torch.randn(n, D, generator=generator,
                                                                                   dtype=torch.float64)
        x = torch.where(KNOWN, known, unknown)
    return x


def test_correlated_regions_match_repaint_and_move_toward_the_conditional():
    """Correlated regions: the wrapper around ddpm gives RePaint's distribution (a direct transcription,
    other random draws), and that distribution is pulled from the marginal toward the exact
    conditional but not all the way (the method's known limit, docs in the module)."""
    n = 3000
    out, image = run("ddpm", n, torch.Generator().manual_seed(3), steps=50)
    ref = repaint_reference(n, 50, torch.Generator().manual_seed(4))
    u, r = out[:, ~KNOWN], ref[:, ~KNOWN]
    se = (r.var(0) * 2 / n).sqrt()
    assert ((u.mean(0) - r.mean(0)).abs() < 4 * se).all(), (u.mean(0), r.mean(0))
    assert (torch.cov(u.T) - torch.cov(r.T)).abs().max() < 0.03
    cond_mean, cond_cov = exact_conditional(image[0])
    gap = (u.mean(0) - cond_mean).abs()
    assert (gap < 0.6 * (MU[~KNOWN] - cond_mean).abs()).all()  # much closer than the marginal
    assert torch.cov(u.T).diagonal().max() < 1.5 * cond_cov.diagonal().max()  # narrowed toward it
    assert (torch.cov(u.T).diagonal() < 0.6 * SIGMA[~KNOWN][:, ~KNOWN].diagonal()).all()


# ---- SDEdit ------------------------------------------------------------------------------------


def test_sdedit_strength_one_is_plain_sampling_for_the_same_seed():
    image = image_batch(8)
    ts = space_timesteps(1000, 10)
    noise = torch.randn(8, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grid, x_start = sdedit_start(image, ts, 1.0, noise, gaussian_adapter(ABAR))
    assert grid == ts and torch.equal(x_start, noise)
    assert torch.equal(ddim(GAUSS, x_start, ABAR, grid), ddim(GAUSS, noise, ABAR, ts))
    grid, x_start = sdedit_start(image, SIGMAS, 1.0, noise, edm_adapter())  # edm: x_T = sigma_max * noise
    assert torch.equal(grid, SIGMAS) and torch.equal(x_start, SIGMAS[0] * noise)


def test_sdedit_small_strength_returns_the_input_and_mid_strength_noises_to_the_cut():
    image = image_batch(4)
    noise = torch.randn(4, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ts = space_timesteps(1000, 20)
    grid, x_start = sdedit_start(image, ts, 0.01, noise, gaussian_adapter(ABAR))
    assert len(grid) == 0 and torch.equal(x_start, image)
    grid, x_start = sdedit_start(image, ts, 0.5, noise, gaussian_adapter(ABAR))
    assert grid == ts[10:]
    abar = ABAR[grid[0]].item()
    assert torch.allclose(x_start, math.sqrt(abar) * image + math.sqrt(1 - abar) * noise)
    ts_flow = flow_timesteps(20)
    grid, x_start = sdedit_start(image, ts_flow, 0.25, noise, flow_adapter())
    assert len(grid) == 6 and grid[-1] == 0 and torch.allclose(grid, ts_flow[-6:])
    assert torch.allclose(x_start, (1 - grid[0]) * image + grid[0] * noise)
    out = heun(VEL, x_start, grid)  # runs from the cut; at this strength it stays near the input
    assert (out - image).abs().mean() < (noise - image).abs().mean()


def test_sdedit_at_mid_strength_samples_the_posterior_of_the_noised_input():
    """From x_t = noised image, ddpm samples p(x0 | x_t): its mean is E[x0 | x_t] averaged over the noise."""
    n = 3000
    image = image_batch(n)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(n, D, generator=g, dtype=torch.float64)
    grid, x_start = sdedit_start(image, space_timesteps(1000, 50), 0.4, noise, gaussian_adapter(ABAR))
    out = ddpm(GAUSS, x_start, ABAR, grid, generator=g)
    abar = ABAR[grid[0]].item()
    expected = posterior_mean(x_start, math.sqrt(abar), math.sqrt(1 - abar)).mean(0)
    assert (out.mean(0) - expected).abs().max() < 0.05


# ---- bad input ----------------------------------------------------------------------------------


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_mask_shape_mismatch_is_one_line():
    image = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="does not fit the image") as e:
        prepare_mask(torch.ones(2, 1, 8, 7), image)
    assert one_line(e)
    with pytest.raises(ConfigError):
        prepare_mask(torch.ones(2, 2, 8, 8), image)  # 2 channels for a 3-channel image
    mask, note = prepare_mask(torch.ones(1, 1, 8, 8).index_fill(3, torch.tensor([0]), 0), image)
    assert mask.shape == image.shape and note is None


def test_non_binary_mask_is_thresholded_at_half_and_said():
    image = torch.zeros(1, 1, 2, 2)
    mask, note = prepare_mask(torch.tensor([[[[0.2, 0.5], [0.7, 0.0]]]]), image)
    assert mask.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]
    assert note and "0.5" in note and "\n" not in note


@pytest.mark.parametrize("value,word", [(0.0, "all black"), (1.0, "all white")])
def test_all_black_or_all_white_mask_is_refused(value, word):
    image = torch.zeros(2, 1, 4, 4)
    mask = torch.full((2, 1, 4, 4), value)
    mask[0, 0, 0, 0] = 1 - value  # the first sample is fine, the second is not
    with pytest.raises(ConfigError, match=word) as e:
        prepare_mask(mask, image)
    assert one_line(e)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan")])
def test_strength_outside_unit_interval_is_refused(strength):
    image = image_batch(2)
    with pytest.raises(ConfigError, match="outside") as e:
        sdedit_start(image, space_timesteps(1000, 10), strength, torch.zeros_like(image), gaussian_adapter(ABAR))
    assert one_line(e)


def test_adapter_for_names_the_families():
    assert adapter_for("flow").family == "flow" and adapter_for("edm").family == "edm"
    assert adapter_for("gaussian", ABAR).family == "gaussian"
    with pytest.raises(ConfigError):
        adapter_for("masked")
    with pytest.raises(ConfigError):
        adapter_for("gaussian")


def test_callback_sees_the_original_as_the_known_data_prediction():
    seen = []
    image = image_batch(4)
    g = torch.Generator().manual_seed(8)
    x_T = torch.randn(4, D, generator=g, dtype=torch.float64)
    inpaint(euler, VEL, x_T, flow_timesteps(4), image=image, mask=MASK, adapter=flow_adapter(), generator=g,
            callback=lambda i, x, x0: seen.append(x0))
    inpaint(ddim, GAUSS, x_T, ABAR, space_timesteps(1000, 4), image=image, mask=MASK,
            adapter=gaussian_adapter(ABAR), generator=g, callback=lambda i, x, x0: seen.append(x0))
    assert len(seen) == 8
    for x0 in seen:
        assert torch.allclose(x0[:, KNOWN], image[:, KNOWN], atol=1e-12)


def test_ddim_state_keeps_the_known_region_on_one_forward_path():
    """eta = 0: the state's known dims stay sqrt(abar') image + sqrt(1 - abar') n, one n throughout
    (the noise that x_T's known dims imply at the first level)."""
    image = image_batch(4)
    g = torch.Generator().manual_seed(9)
    x_T = torch.randn(4, D, generator=g, dtype=torch.float64)
    ts = space_timesteps(1000, 6)
    states = []
    inpaint(ddim, GAUSS, x_T, ABAR, ts, image=image, mask=MASK, adapter=gaussian_adapter(ABAR), generator=g,
            callback=lambda i, x, x0: states.append(x))
    a0 = ABAR[ts[0]].item()
    n = (x_T[:, KNOWN] - math.sqrt(a0) * image[:, KNOWN]) / math.sqrt(1 - a0)
    for i, x in enumerate(states[:-1]):
        a = ABAR[ts[i + 1]].item()
        implied = (x[:, KNOWN] - math.sqrt(a) * image[:, KNOWN]) / math.sqrt(1 - a)
        assert torch.allclose(implied, n, atol=1e-9)

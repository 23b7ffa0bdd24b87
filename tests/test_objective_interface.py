"""The Objective interface of the Gaussian and flow objectives (ditkit.diffusion.objective):
registration, from_config on a real Config, global_draws, and sample() giving bit for bit what
calling the samplers directly gives."""

import pytest
import torch

from ditkit.config import Config
from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.diffusion.schedules import (
    flow_sampling_times,
    make_schedule,
    sample_flow_time,
    sample_noise,
    sample_timestep_indices,
    space_timesteps,
)
from ditkit.registry import OBJECTIVES
from ditkit.samplers.flow import euler, flow_timesteps, heun
from ditkit.samplers.gaussian import ddim, ddpm, dpm_solver_pp_2m
from ditkit.samplers.noise import randn

SHAPE = (2, 4, 4)


def test_registered_with_family_and_modality():
    for kind, cls in (("gaussian", GaussianDiffusion), ("flow", FlowMatching)):
        entry = OBJECTIVES.get(kind, modality="image")
        assert entry.obj is cls and entry.family == kind == cls.family


def test_from_config_on_a_real_config():
    cfg = Config()
    cfg.objective.prediction, cfg.objective.schedule, cfg.objective.num_timesteps = "v", "cosine", 200
    g = GaussianDiffusion.from_config(cfg, clip_x0=1.0)
    assert (g.prediction, g.learn_sigma, g.clip_x0, g.num_timesteps, g.loss_weighting) == ("v", True, 1.0, 200, "none")
    assert torch.equal(g.alphas_cumprod, make_schedule("cosine", 200).alphas_cumprod)
    cfg.objective.kind, cfg.objective.time_sampling, cfg.objective.loss_weighting = "flow", "logit_normal", "min_snr"
    f = FlowMatching.from_config(cfg, clip_x0=1.0)
    assert (f.time_sampling, f.loss_weighting, f.min_snr_gamma) == ("logit_normal", "min_snr", cfg.objective.min_snr_gamma)


def _old_global_draws(objective, x, global_batch, rows, generator):
    """ditkit.train.distributed.global_draws as it was before the objectives had the method."""
    if isinstance(objective, GaussianDiffusion):
        t = sample_timestep_indices(global_batch, objective.num_timesteps, generator=generator, device=x.device)
    else:
        t = sample_flow_time(
            global_batch, objective.time_sampling, logit_mean=objective.logit_mean, logit_std=objective.logit_std,
            generator=generator, device=x.device,
        )
    like = torch.empty((global_batch, *x.shape[1:]), dtype=x.dtype, device=generator.device)
    return {"t": t[rows], "noise": sample_noise(like, generator=generator)[rows].to(x.device)}


OBJECTIVES_UNDER_TEST = [
    GaussianDiffusion(make_schedule("linear", 1000)),
    FlowMatching(),
    FlowMatching("logit_normal", logit_mean=0.5, logit_std=0.8),
]


@pytest.mark.parametrize("objective", OBJECTIVES_UNDER_TEST)
def test_global_draws_same_numbers_as_before_and_as_the_whole_batch(objective):
    x_global = torch.randn(6, *SHAPE)
    seen = []

    def model(x, t, y):
        seen.append((x, t))
        return torch.zeros_like(x)

    objective.loss(model, x_global, None, torch.Generator().manual_seed(9))
    for rows in (slice(0, 2), slice(2, 6)):
        got = objective.global_draws(x_global[rows], 6, rows, torch.Generator().manual_seed(9))
        old = _old_global_draws(objective, x_global[rows], 6, rows, torch.Generator().manual_seed(9))
        assert got.keys() == old.keys() == {"t", "noise"}
        assert all(torch.equal(got[k], old[k]) for k in got)
        objective.loss(model, x_global[rows], None, **got)
        assert torch.equal(seen[-1][0], seen[0][0][rows]) and torch.equal(seen[-1][1], seen[0][1][rows])


def test_flow_sampling_times_equal_the_samplers_grid():
    for n in (1, 2, 7, 50):
        for shift in (1.0, 3.0, 0.5):
            assert torch.equal(flow_sampling_times(n, shift), flow_timesteps(n, shift))
    with pytest.raises(ValueError):
        flow_sampling_times(0)


def _net(x, t):
    """A deterministic stand-in network, (B, C, H, W) and (B,) -> (B, C, H, W)."""
    return 0.3 * x.flip(1) + torch.sin(t / 200.0).reshape(-1, 1, 1, 1) * x.roll(1, dims=-1)


def _generators():
    return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]


def _x_T():
    return randn((3, *SHAPE), _generators())


@pytest.mark.parametrize(
    "sampler,options,spacing",
    [(ddpm, {}, "uniform"), (ddim, {"eta": 1.0}, "quadratic"), (ddim, {}, "uniform"), (dpm_solver_pp_2m, {}, "quadratic")],
)
def test_gaussian_sample_is_the_direct_sampler_call(sampler, options, spacing):
    objective = GaussianDiffusion(make_schedule("linear", 1000), "eps", clip_x0=1.0)
    seen = []
    got = objective.sample(
        sampler, _net, _x_T(), 12, generator=_generators(), callback=lambda i, x, x0: seen.append(i),
        timestep_spacing=spacing, **options,
    )
    timesteps = space_timesteps(1000, 12, spacing)
    seen_direct = []
    direct = sampler(
        objective.denoiser(_net), _x_T(), objective.alphas_cumprod, timesteps, generator=_generators(),
        callback=lambda i, x, x0: seen_direct.append(i), **options,
    )
    assert torch.equal(got, direct) and seen == seen_direct and len(seen) >= 11


@pytest.mark.parametrize("sampler", [euler, heun])
def test_flow_sample_is_the_direct_sampler_call(sampler):
    objective = FlowMatching()
    got = objective.sample(sampler, _net, _x_T(), 9, generator=_generators(), callback=None)
    assert torch.equal(got, sampler(objective.denoiser(_net), _x_T(), flow_timesteps(9)))
    shifted = objective.sample(sampler, _net, _x_T(), 9, generator=None, shift=3.0)
    assert torch.equal(shifted, sampler(objective.denoiser(_net), _x_T(), flow_timesteps(9, 3.0)))
    assert not torch.equal(shifted, got)


def test_prior_is_per_sample_standard_normal():
    for objective in OBJECTIVES_UNDER_TEST[:2]:
        assert torch.equal(objective.prior((3, *SHAPE), _generators()), _x_T())

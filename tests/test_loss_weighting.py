"""Min-SNR-gamma loss weighting (Hang et al. 2023, arXiv 2303.09556) in the Gaussian and flow
objectives: the weights on tiny inputs against hand-computed values, their equivalence across
parameterisations, and "none" leaving the loss exactly as it was."""

import math
from types import SimpleNamespace

import pytest
import torch

from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.diffusion.schedules import (
    GaussianSchedule,
    eps_from_x0,
    flow_snr,
    make_schedule,
    min_snr_weight,
    prediction_target,
    snr_from_alphas_cumprod,
    v_from_x0_eps,
)
from ditkit.errors import ConfigError

# abar = 0.8, 0.5, 0.2 -> SNR = 4, 1, 0.25 (alphas 0.8, 0.625, 0.4)
TINY = GaussianSchedule.from_betas(torch.tensor([0.2, 0.375, 0.6], dtype=torch.float64))
GAMMA = 2.0
HAND = {  # min(SNR, 2) = 2, 1, 0.25
    "x0": [2.0, 1.0, 0.25],
    "eps": [2.0 / 4, 1.0, 1.0],  # / SNR
    "v": [2.0 / 5, 1.0 / 2, 0.25 / 1.25],  # / (SNR + 1)
    "flow": [2.0 / 9, 1.0 / 4, 0.25 / 2.25],  # / (1 + sqrt SNR)^2
}


def test_snr_and_weights_hand_values():
    assert torch.allclose(TINY.alphas_cumprod, torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64))
    snr = snr_from_alphas_cumprod(TINY.alphas_cumprod)
    assert torch.allclose(snr, torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    for prediction, expected in HAND.items():
        assert torch.allclose(min_snr_weight(snr, GAMMA, prediction), torch.tensor(expected, dtype=torch.float64)), prediction
    # flow: t = 1/3, 1/2, 2/3 have SNR ((1 - t) / t)^2 = 4, 1, 0.25
    assert torch.allclose(flow_snr(torch.tensor([1 / 3, 0.5, 2 / 3], dtype=torch.float64)), snr)
    # no noise (SNR = inf): the limits, not NaN
    inf = torch.tensor([math.inf], dtype=torch.float64)
    assert [min_snr_weight(inf, GAMMA, p).item() for p in ("x0", "eps", "v", "flow")] == [2.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        min_snr_weight(snr, 0.0, "eps")
    with pytest.raises(ValueError):
        min_snr_weight(snr, GAMMA, "score")


def _zero_model(channels=None):
    def model(x, t, y):
        out = torch.zeros_like(x)
        return out if channels is None else torch.cat([out, torch.zeros_like(x)], 1)

    return model


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_gaussian_min_snr_loss_is_weight_times_mse(prediction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    t = torch.tensor([0, 1, 2])
    objective = GaussianDiffusion(TINY, prediction, loss_weighting="min_snr", min_snr_gamma=GAMMA)
    terms = objective.loss_terms(_zero_model(), x0, None, t=t, noise=noise)
    abar = TINY.alphas_cumprod.float().reshape(-1, 1, 1, 1)
    mse = prediction_target(x0, noise, abar, prediction).pow(2).flatten(1).mean(1)  # the model predicts 0
    assert torch.allclose(terms["mse"], mse)
    assert torch.allclose(terms["loss"], torch.tensor(HAND[prediction]) * mse)
    assert torch.allclose(objective.loss_weights(t), torch.tensor(HAND[prediction], dtype=torch.float64))
    assert objective.loss_weights(t, like=x0).dtype == torch.float32


def test_gaussian_min_snr_leaves_the_vb_term_unweighted():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 1, 2, 2, generator=g) * 2 - 1, torch.randn(3, 1, 2, 2, generator=g)
    t = torch.tensor([0, 1, 2])
    objective = GaussianDiffusion(TINY, "eps", learn_sigma=True, loss_weighting="min_snr", min_snr_gamma=GAMMA)
    terms = objective.loss_terms(_zero_model(2), x0, None, t=t, noise=noise)
    assert bool((terms["vb"] > 0).all())
    assert torch.allclose(terms["loss"], torch.tensor(HAND["eps"]) * terms["mse"] + terms["vb"])


def test_min_snr_is_one_objective_in_every_parameterisation():
    # For one x0 estimate, the weighted eps / v / x0 losses are all min(SNR, gamma) ||x0_hat - x0||^2,
    # and so is the weighted flow loss at a time with the same SNR.
    schedule, g = make_schedule("linear", 1000), torch.Generator().manual_seed(1)
    t = torch.tensor([5, 100, 400, 900])
    x0, noise = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps_hat = eps_from_x0(x_t, x0_hat, abar)
    outputs = {"x0": x0_hat, "eps": eps_hat, "v": v_from_x0_eps(x0_hat, eps_hat, abar)}
    snr = snr_from_alphas_cumprod(abar.flatten())
    x0_err = (x0_hat - x0).pow(2).flatten(1).mean(1)
    expected = snr.clamp(max=GAMMA) * x0_err
    for prediction, out in outputs.items():
        objective = GaussianDiffusion(schedule, prediction, loss_weighting="min_snr", min_snr_gamma=GAMMA)
        loss = objective.loss(lambda x, tt, y, out=out: out, x0, None, t=t, noise=noise)
        assert torch.allclose(loss, expected, rtol=1e-4), prediction  # the model output goes through float32
    # flow at the same SNR: (1 - s) / s = sqrt(SNR), and the x0 estimate from v: x0 = x_s - s v
    s = 1 / (1 + snr.sqrt())
    s_b = s.reshape(-1, 1, 1, 1)
    x_s = (1 - s_b) * x0 + s_b * noise
    v_hat = (x_s - x0_hat) / s_b
    flow = FlowMatching(loss_weighting="min_snr", min_snr_gamma=GAMMA)
    loss = flow.loss(lambda x, tt, y: v_hat, x0, None, t=s, noise=noise)
    assert torch.allclose(loss, expected, rtol=1e-4)


def test_none_is_bit_identical_to_the_unweighted_loss():
    # the loss as it was before weighting existed, op for op
    schedule, g = make_schedule("linear", 1000), torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    weight = torch.randn(2, 2, generator=g)
    model = lambda x, t, y: torch.einsum("bchw,dc->bdhw", x, weight) * torch.cos(t / 100).reshape(-1, 1, 1, 1)  # noqa: E731
    for prediction in ("eps", "v", "x0"):
        objective = GaussianDiffusion(schedule, prediction)
        assert objective.loss_weighting == "none"
        loss = objective.loss(model, x0, None, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)
        t = torch.randint(0, 1000, (5,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        mse = (prediction_target(x0, noise, abar, prediction) - model(x_t, t.float(), None).float()).pow(2).flatten(1).mean(1)
        assert torch.equal(loss, mse + torch.zeros_like(mse)), prediction
    flow = FlowMatching("logit_normal")
    loss = flow.loss(model, x0, None, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    t = torch.sigmoid(0.0 + 1.0 * torch.randn(5, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    t_b = t.reshape(-1, 1, 1, 1)
    x_t = (1 - t_b) * x0 + t_b * noise
    assert torch.equal(loss, ((model(x_t, 1000.0 * t, None).float() - (noise - x0)) ** 2).flatten(1).mean(1))


def test_flow_min_snr_weights_hand_values():
    flow = FlowMatching(loss_weighting="min_snr", min_snr_gamma=GAMMA)
    t = torch.tensor([1 / 3, 0.5, 2 / 3, 0.8])
    # SNR 4, 1, 1/4, 1/16 -> min(SNR, 2) t^2
    expected = torch.tensor([2 / 9, 1 / 4, 1 / 4 * 4 / 9, 1 / 16 * 0.64], dtype=torch.float64)
    assert torch.allclose(flow.loss_weights(t).double(), expected, rtol=1e-5)  # float32 times
    assert torch.allclose(flow.loss_weights(t.double()), flow_snr(t.double()).clamp(max=GAMMA) * t.double() ** 2, rtol=1e-12)
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    terms = flow.loss_terms(_zero_model(), x0, None, t=t, noise=noise)
    assert torch.allclose(terms["loss"], expected.float() * (noise - x0).pow(2).flatten(1).mean(1))
    assert torch.allclose(terms["mse"], (noise - x0).pow(2).flatten(1).mean(1))
    assert FlowMatching().loss_weights(t).tolist() == [1.0] * 4


def _cfg(**objective):
    base = dict(
        kind="gaussian", schedule="linear", num_timesteps=1000, prediction="v", learn_sigma=False,
        time_sampling="uniform", loss_weighting="min_snr", min_snr_gamma=3.0,
    )
    return SimpleNamespace(objective=SimpleNamespace(**{**base, **objective}))


def test_from_config_reads_the_weighting():
    objective = GaussianDiffusion.from_config(_cfg(), clip_x0=1.0)
    assert (objective.prediction, objective.loss_weighting, objective.min_snr_gamma, objective.clip_x0) == ("v", "min_snr", 3.0, 1.0)
    flow = FlowMatching.from_config(_cfg(kind="flow", time_sampling="logit_normal"))
    assert (flow.time_sampling, flow.loss_weighting, flow.min_snr_gamma) == ("logit_normal", "min_snr", 3.0)
    plain = SimpleNamespace(objective=SimpleNamespace(schedule="cosine", num_timesteps=100, prediction="eps", learn_sigma=True))
    assert GaussianDiffusion.from_config(plain).loss_weighting == "none"  # older configs: no field, no weighting
    for bad in (dict(loss_weighting="p2"), dict(min_snr_gamma=0.0)):
        with pytest.raises(ConfigError, match="objective.(loss_weighting|min_snr_gamma)"):
            GaussianDiffusion.from_config(_cfg(**bad))
        with pytest.raises(ConfigError, match="objective.(loss_weighting|min_snr_gamma)"):
            FlowMatching.from_config(_cfg(kind="flow", **bad))
    with pytest.raises(ConfigError, match="objective.time_sampling"):
        FlowMatching.from_config(_cfg(kind="flow", time_sampling="stratified"))
    with pytest.raises(ValueError):
        GaussianDiffusion(TINY, loss_weighting="snr")

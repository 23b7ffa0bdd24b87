"""Gaussian and flow-matching objectives (ditkit.diffusion): targets, hybrid loss, overfitting."""

import math

import pytest
import torch
from torch import nn

from ditkit.diffusion import FlowMatching, GaussianDiffusion, make_schedule
from ditkit.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from ditkit.diffusion.schedules import prediction_target

SCHEDULE = make_schedule("linear", 1000)


class TinyNet(nn.Module):
    """Stand-in for a DiT: MLP on (flattened x, sinusoid of t on the [0, 1000) scale, label)."""

    def __init__(self, shape=(1, 4, 4), out_channels=1, num_classes=4, hidden=256):
        super().__init__()
        self.shape, self.out_channels = shape, out_channels
        dim = math.prod(shape)
        self.label = nn.Embedding(num_classes + 1, 64)
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(16) / 16))
        self.mlp = nn.Sequential(
            nn.Linear(dim + 64 + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out_channels * math.prod(shape[1:])),
        )

    def forward(self, x, t, y):
        angles = t[:, None] * self.freqs[None]
        h = torch.cat([x.flatten(1), angles.sin(), angles.cos(), self.label(y)], 1)
        return self.mlp(h).reshape(len(x), self.out_channels, *self.shape[1:])


def _oracle(x0, noise, prediction, extra=None, seen=None):
    """A 'model' that knows x0 and noise and returns the exact target at whatever t it is given."""

    def model(x_t, t, y):
        if seen is not None:
            seen.append(t)
        abar = SCHEDULE.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1)
        assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
        target = prediction_target(x0, noise, abar, prediction)
        return target if extra is None else torch.cat([target, extra], 1)

    return model


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_gaussian_exact_target_has_zero_loss_and_denoiser_inverts_it(prediction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    seen = []
    diffusion = GaussianDiffusion(SCHEDULE, prediction)
    loss = diffusion.loss(_oracle(x0, noise, prediction, seen=seen), x0, None, t=t, noise=noise)
    assert loss.shape == (6,) and float(loss.max()) < 1e-10
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], t.float())  # index passed as float
    # the denoiser turns the same raw output back into x0 and eps
    abar = SCHEDULE.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    net = lambda x, tf: _oracle(x0, noise, prediction)(x, tf, None)  # noqa: E731
    pred = diffusion.denoiser(net)(x_t, t)
    assert pred.var_frac is None
    assert torch.allclose(pred.x0[2:], x0[2:], atol=1e-3)  # x0 from eps is ill-conditioned at t = 0, 1
    assert torch.allclose(pred.eps[:-1], noise[:-1], atol=1e-3)  # eps from x0 is ill-conditioned at t = T-1


def test_gaussian_loss_draws_uniform_t_and_is_deterministic():
    seen = []
    model = lambda x, t, y: (seen.append(t), torch.zeros_like(x))[1]  # noqa: E731
    diffusion = GaussianDiffusion(SCHEDULE)
    x0 = torch.randn(4000, 1, 2, 2)
    a = diffusion.loss(model, x0, None, torch.Generator().manual_seed(1))
    b = diffusion.loss(model, x0, None, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    t = seen[0]
    assert float(t.min()) == 0 and float(t.max()) == 999 and float(t.mean()) == pytest.approx(499.5, abs=15)
    assert float(a.mean()) == pytest.approx(1.0, abs=0.05)  # zero output: eps MSE = E[eps^2] = 1


def test_learned_sigma_channel_check():
    diffusion = GaussianDiffusion(SCHEDULE, learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        diffusion.loss(lambda x, t, y: x, torch.randn(2, 3, 4, 4), None)


def test_vb_is_zero_for_the_true_posterior_and_nonnegative_otherwise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 2, 5, 50, 200, 500, 900, 999])
    diffusion = GaussianDiffusion(SCHEDULE, "eps", learn_sigma=True)
    # exact eps and v = -1 (f = 0: log variance = clipped posterior log variance) -> the KL is 0
    exact = _oracle(x0, noise, "eps", extra=-torch.ones_like(x0))
    terms = diffusion.loss_terms(exact, x0, None, t=t, noise=noise)
    assert float(terms["mse"].abs().max()) < 1e-10 and float(terms["vb"].abs().max()) < 1e-4
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])
    # any other mean or variance -> KL > 0
    for scale in (0.1, 1.0):
        wrong = lambda x, tt, y: torch.randn(8, 6, 4, 4, generator=g) * scale  # noqa: E731
        assert float(diffusion.loss_terms(wrong, x0, None, t=t, noise=noise)["vb"].min()) > 0
    v_up = _oracle(x0, noise, "eps", extra=torch.full_like(x0, 0.5))
    vb = diffusion.loss_terms(v_up, x0, None, t=t, noise=noise)["vb"]
    assert float(vb[:5].min()) > 0 and float(vb.min()) >= 0  # at large t, beta ~ posterior variance: KL ~ 0


def test_vb_at_t0_is_the_discretized_decoder_nll():
    # x0 on the interior of [-1, 1], exact mean: NLL = -log2 P(|N(0, s^2)| < 1/255), s^2 the model variance
    x0 = torch.full((1, 1, 2, 2), 0.25)
    noise = torch.randn(x0.shape)
    diffusion = GaussianDiffusion(SCHEDULE, "eps", learn_sigma=True)
    t = torch.tensor([0])
    vb = diffusion.loss_terms(_oracle(x0, noise, "eps", extra=torch.ones_like(x0)), x0, None, t=t, noise=noise)["vb"]
    std = math.sqrt(SCHEDULE.betas[0].item())  # f = 1: variance beta_0
    prob = math.erf(1 / 255 / std / math.sqrt(2))
    assert float(vb) == pytest.approx(-math.log2(prob), rel=1e-4)
    # edge bins take the tails
    x = torch.tensor([-1.0, 1.0])
    ll = discretized_gaussian_log_likelihood(x, x, torch.log(torch.tensor([0.01, 0.01])))
    assert torch.allclose(ll.exp(), torch.full((2,), 0.5 + 0.5 * math.erf(1 / 255 / 0.01 / math.sqrt(2))), atol=1e-6)


def test_normal_kl_closed_form():
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    # 0.5 (s1^2/s2^2 + dmu^2/s2^2 - 1 + log s2^2/s1^2)
    assert float(kl) == pytest.approx(0.5 * (4 + 1 - 1 - math.log(4)))


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    out = torch.randn(4, 4, 4, 4, generator=g, requires_grad=True)
    diffusion = GaussianDiffusion(SCHEDULE, "v", learn_sigma=True)
    t = torch.tensor([0, 3, 100, 700])
    terms = diffusion.loss_terms(lambda x, tt, y: out, x0, None, g, t=t)
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert float(vb_grad[:, :2].abs().max()) == 0 and float(vb_grad[:, 2:].abs().max()) > 0
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert float(mse_grad[:, 2:].abs().max()) == 0 and float(mse_grad[:, :2].abs().max()) > 0


def test_learned_sigma_denoiser_var_frac():
    diffusion = GaussianDiffusion(SCHEDULE, learn_sigma=True)
    v = torch.rand(2, 3, 4, 4) * 2 - 1
    denoise = diffusion.denoiser(lambda x, t: torch.cat([torch.zeros_like(x), v], 1))
    pred = denoise(torch.randn(2, 3, 4, 4), torch.tensor([5, 9]))
    assert torch.allclose(pred.var_frac, (v + 1) / 2)
    clipped = GaussianDiffusion(SCHEDULE, "x0", clip_x0=1.0).denoiser(lambda x, t: 3 * torch.ones_like(x))
    assert float(clipped(torch.randn(2, 3, 4, 4), torch.tensor([5, 9])).x0.max()) == 1.0


def test_flow_exact_velocity_has_zero_loss():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    seen = []

    def oracle(x_t, t_scaled, y):
        seen.append(t_scaled)
        tb = (t_scaled / 1000).reshape(-1, 1, 1, 1)
        assert torch.allclose(x_t, (1 - tb) * x0 + tb * noise, atol=1e-6)
        return noise - x0

    assert float(FlowMatching().loss(oracle, x0, None, t=t, noise=noise).max()) < 1e-12
    assert torch.allclose(seen[0], 1000 * t)  # network sees the [0, 1000) scale
    velocity = FlowMatching().denoiser(lambda x, ts: ts.reshape(-1, 1, 1, 1) * torch.ones_like(x))
    assert torch.allclose(velocity(x0, t)[:, 0, 0, 0], 1000 * t)
    with pytest.raises(ValueError, match="learn_sigma=False"):
        FlowMatching().loss(lambda x, ts, y: torch.cat([x, x], 1), x0, None)


def test_flow_logit_normal_times_reach_the_model():
    seen = []
    model = lambda x, ts, y: (seen.append(ts), torch.zeros_like(x))[1]  # noqa: E731
    objective = FlowMatching("logit_normal", logit_mean=1.0)
    objective.loss(model, torch.randn(4000, 1, 2, 2), None, torch.Generator().manual_seed(0))
    t = seen[0] / 1000
    assert float(torch.log(t / (1 - t)).mean()) == pytest.approx(1.0, abs=0.06)
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatching("cosine")


def _overfit_ratio(objective, out_channels, steps=600):
    """Train TinyNet on 4 fixed 1x4x4 images (label = image index); loss before / after on fixed draws."""
    torch.manual_seed(0)
    data = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(4)
    net = TinyNet(out_channels=out_channels)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    lr_decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    x_eval, y_eval = data.repeat(64, 1, 1, 1), labels.repeat(64)

    def eval_loss():
        with torch.no_grad():
            return objective.loss(net, x_eval, y_eval, torch.Generator().manual_seed(123)).mean().item()

    before, g = eval_loss(), torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 4, (64,), generator=g)
        loss = objective.loss(net, data[idx], labels[idx], g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_decay.step()
    return before / eval_loss()


@pytest.mark.slow  # an overfit run
@pytest.mark.parametrize(
    "name,objective,out_channels",
    [
        ("eps", GaussianDiffusion(SCHEDULE, "eps"), 1),
        ("v", GaussianDiffusion(SCHEDULE, "v"), 1),
        ("hybrid", GaussianDiffusion(SCHEDULE, "eps", learn_sigma=True), 2),
        ("flow", FlowMatching(), 1),
        ("flow_logit_normal", FlowMatching("logit_normal"), 1),
    ],
)
def test_objective_overfits_four_images(name, objective, out_channels):
    # measured (600 Adam steps, ~1 s each on one core): eps 28x, v 15x, hybrid 24x, flow 28x, logit-normal 88x
    assert _overfit_ratio(objective, out_channels) > 10, name


def test_contract_with_a_new_dit():
    # A new DiT outputs zeros (adaLN-Zero): eps = 0, v = 0 -> var_frac = 1/2, loss = mean(noise^2).
    from ditkit.models.dit import build_dit
    from ditkit.samplers import classifier_free_guidance, ddpm

    model = build_dit("DiT-T/2", input_size=8, in_channels=2, num_classes=3, learn_sigma=True)
    diffusion = GaussianDiffusion(SCHEDULE, "eps", learn_sigma=True)
    x0, y = torch.rand(2, 2, 8, 8) * 2 - 1, torch.tensor([0, 2])
    noise = torch.randn(x0.shape)
    terms = diffusion.loss_terms(model, x0, y, t=torch.tensor([0, 500]), noise=noise)
    assert torch.allclose(terms["mse"], noise.pow(2).flatten(1).mean(1))
    assert bool((terms["vb"] >= 0).all()) and terms["loss"].shape == (2,)
    net = classifier_free_guidance(model.eval(), y, cfg_scale=4.0, null_class=3, guide_channels=2)
    pred = diffusion.denoiser(net)(noise, torch.tensor([999, 999]))
    assert torch.equal(pred.eps, torch.zeros_like(noise)) and torch.equal(pred.var_frac, torch.full_like(noise, 0.5))
    out = ddpm(diffusion.denoiser(net), noise, diffusion.alphas_cumprod, [999, 500, 0], generator=torch.Generator())
    assert out.shape == x0.shape and bool(out.isfinite().all())

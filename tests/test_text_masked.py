"""Masked diffusion (MDLM): the loss against the NELBO formula, time sampling, SUBS, the samplers."""

import math

import numpy as np
import pytest
import torch

from ditkit.diffusion.masked import MaskedDiffusion, stratified_times, subs_log_probs
from ditkit.eval.text import masked_diffusion_bound
from ditkit.samplers.masked import ancestral, canvas, gumbel_argmax, semi_autoregressive

V, L = 5, 6


class CountToy:
    """Toy model whose logits depend on position and on the number k of masked tokens in the row:
    logits = base[l] * (1 + k / L). Ignores t."""

    def __init__(self, seed: int = 0, count_dependent: bool = True):
        self.base = torch.randn(L, V, generator=torch.Generator().manual_seed(seed))
        self.count_dependent = count_dependent

    def __call__(self, z, t, y=None):
        k = (z == V).sum(1).float() if self.count_dependent else torch.zeros(z.shape[0])
        return self.base.unsqueeze(0) * (1 + k / L)[:, None, None]

    def cost(self, x: torch.Tensor, k: int) -> float:
        """cbar_k = (1 / L) sum_l -log p_k(x_l): the mean cost of a masked position given k masks."""
        logp = torch.log_softmax(self.base * (1 + k / L if self.count_dependent else 1.0), -1).double()
        return float(-logp[torch.arange(L), x].mean())


def exact_nelbo(toy: CountToy, x: torch.Tensor, eps: float) -> float:
    """int_0^1 (1/t) sum_k Binom(k; L, (1-eps) t) k cbar_k dt, by Gauss-Legendre (the integrand is a
    polynomial of degree < L in t, so L nodes are exact)."""
    nodes, weights = np.polynomial.legendre.leggauss(L + 2)
    t, w = (nodes + 1) / 2, weights / 2
    a = 1 - eps
    total = 0.0
    for k in range(1, L + 1):
        binom_over_t = math.comb(L, k) * a**k * t ** (k - 1) * (1 - a * t) ** (L - k)
        total += k * toy.cost(x, k) * float((w * binom_over_t).sum())
    return total


def test_loss_matches_the_nelbo_formula_on_a_toy_model():
    toy = CountToy()
    x = torch.randint(0, V, (L,), generator=torch.Generator().manual_seed(1))
    obj = MaskedDiffusion(V, eps=1e-3)
    batch = x.expand(20000, L).clone()
    terms = obj.loss_terms(toy, batch, None, torch.Generator().manual_seed(2))
    estimate, stderr = terms["nll"].double().mean(), terms["nll"].double().std() / math.sqrt(len(batch))
    truth = exact_nelbo(toy, x, obj.eps)
    assert abs(float(estimate) - truth) < 4 * float(stderr), (float(estimate), truth, float(stderr))
    assert torch.allclose(terms["loss"], terms["nll"] / L)
    # A weight of 1 instead of 1/t (plain masked-LM loss) would be far off: the test can fail.
    plain = (terms["nll"] * terms["t"]).double().mean()
    assert abs(float(plain) - truth) > 20 * float(stderr)
    # The number-of-masks form of the same bound: sum_k cbar_k (eps -> 0).
    count = obj.count_form_nll(toy, batch, None, torch.Generator().manual_seed(3)).double()
    truth0 = sum(toy.cost(x, k) for k in range(1, L + 1))
    assert abs(float(count.mean()) - truth0) < 4 * float(count.std() / math.sqrt(len(batch)))
    assert abs(truth0 - truth) < 0.01 * truth  # the two forms differ by O(eps)


def test_unigram_toy_bound_in_bits_equals_entropy_form():
    """A context-free model: NELBO = (1 - eps) sum_l -log p(x_l) + L eps log V, exactly."""
    toy = CountToy(count_dependent=False)
    obj = MaskedDiffusion(V, eps=0.05)
    x = torch.randint(0, V, (256, L), generator=torch.Generator().manual_seed(4))
    res = masked_diffusion_bound(obj, toy, x, num_passes=8, generator=torch.Generator().manual_seed(5))
    logp = torch.log_softmax(toy.base, -1).double()
    per_seq = -logp[torch.arange(L), x].sum(1)
    truth_bits = float((0.95 * per_seq.sum() + x.numel() * 0.05 * math.log(V)) / math.log(2) / x.numel())
    assert res.stderr_bits_per_token > 0 and res.num_passes == 8 and not res.exact
    assert abs(res.bits_per_token - truth_bits) < 4 * res.stderr_bits_per_token + 1e-9
    assert res.bits_per_char == res.bits_per_token  # one character per token by default
    half = masked_diffusion_bound(obj, toy, x, num_chars=2 * x.numel(), num_passes=2)
    assert abs(half.bits_per_char - half.bits_per_token / 2) < 1e-12


def test_stratified_times_are_marginally_uniform_and_cover_the_strata():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_times(8, generator=g) for _ in range(4000)])  # (4000, 8)
    assert draws.min() > 0 and draws.max() <= 1
    strata = torch.floor((1 - draws) * 8).sort(1).values  # one time in each stratum per batch
    assert torch.equal(strata, torch.arange(8.0).expand(4000, 8))
    # Each position on its own is U(0, 1]: not tied to one stratum (the failure of a shared offset).
    assert (draws.mean(0) - 0.5).abs().max() < 0.03
    assert ((draws[:, 0] < 0.25).float().mean() - 0.25).abs() < 0.03


def test_masking_probability_follows_log_linear_schedule():
    obj = MaskedDiffusion(V, eps=0.1)
    x = torch.randint(0, V, (4000, 50))
    t = torch.full((4000,), 0.5)
    z = obj.mask_tokens(x, t, torch.Generator().manual_seed(0))
    assert abs((z == V).float().mean().item() - 0.9 * 0.5) < 0.01
    assert torch.equal(z[z != V], x[z != V])  # unmasked tokens are the data
    assert ((obj.mask_tokens(x[:50], torch.ones(50)) == V).float().mean() - 0.9).abs() < 0.03


def test_subs_no_mass_on_mask_and_carry_over():
    logits = torch.randn(2, L, V)
    z = torch.tensor([[0, V, 2, V, V, 4], [V] * L])
    logp = subs_log_probs(logits, z, mask_id=V)
    assert logp.shape == (2, L, V + 1)
    assert torch.isneginf(logp[..., V]).all()  # zero masking probability
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, L))
    clean = z != V
    assert torch.equal(logp[clean].argmax(-1), z[clean]) and (logp[clean].exp().max(-1).values == 1).all()
    torch.testing.assert_close(logp[~clean][:, :V], torch.log_softmax(logits, -1)[~clean])
    obj = MaskedDiffusion(V)
    torch.testing.assert_close(obj.denoiser(lambda x, t: logits)(z, torch.ones(2)), logp)


def joint_toy():
    """Two positions, V = 3, a correlated joint; the exact SUBS denoiser for it."""
    joint = torch.tensor([[0.30, 0.02, 0.08], [0.02, 0.25, 0.03], [0.10, 0.05, 0.15]], dtype=torch.float64)

    # Column / row 3 (the mask) holds the marginal: p(x0 | x1 masked), p(x1 | x0 masked).
    given_x1 = torch.cat([joint, joint.sum(1, keepdim=True)], 1)  # (3, 4): [x0, x1 or mask]
    given_x0 = torch.cat([joint, joint.sum(0, keepdim=True)], 0)  # (4, 3): [x0 or mask, x1]

    def denoiser(z, t):
        p0 = given_x1[:, z[:, 1]].T  # (B, 3)
        p1 = given_x0[z[:, 0]]  # (B, 3)
        logits = torch.stack([p0, p1], 1).log()  # unnormalised log-probs; SUBS normalises
        return subs_log_probs(logits, z, mask_id=3)

    return joint, denoiser


def empirical_joint(samples: torch.Tensor) -> torch.Tensor:
    return torch.bincount(samples[:, 0] * 3 + samples[:, 1], minlength=9).double().view(3, 3) / len(samples)


def test_ancestral_sampler_draws_from_the_model_joint():
    joint, denoiser = joint_toy()
    x = canvas(2, 3, 6000)
    many = ancestral(denoiser, x, 64, mask_id=3, generator=torch.Generator().manual_seed(0))
    assert (empirical_joint(many) - joint).abs().max() < 0.025
    # One step reveals both positions at once: the product of the marginals, not the joint.
    one = ancestral(denoiser, x, 1, mask_id=3, generator=torch.Generator().manual_seed(1))
    product = joint.sum(1)[:, None] * joint.sum(0)[None]
    assert (empirical_joint(one) - product).abs().max() < 0.025
    assert (product - joint).abs().max() > 0.1


def test_reveal_schedule_and_no_mask_left():
    logits = torch.zeros(1, 1, V)
    seen = []
    x = canvas(200, V, 50)
    out = ancestral(
        lambda z, t: subs_log_probs(logits.expand(*z.shape, V), z, V),
        x,
        10,
        mask_id=V,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, z, x0: seen.append((z == V).float().mean().item()),
    )
    assert not (out == V).any()
    expected = [1 - (i + 1) / 10 for i in range(10)]  # fraction still masked after step i is s
    assert max(abs(a - b) for a, b in zip(seen, expected)) < 0.01


@pytest.mark.parametrize("remasking", ["random", "low_confidence"])
def test_fixed_positions_untouched(remasking):
    toy = CountToy(seed=3)
    obj = MaskedDiffusion(V)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (16, L), generator=g)
    free = torch.rand(16, L, generator=g) < 0.5  # an arbitrary infill pattern per row
    x[free] = V
    x[:, 0] = 1  # and a prompt in the first position
    out = ancestral(obj.denoiser(lambda z, t: toy(z, t)), x, 4, mask_id=V, remasking=remasking, generator=g)
    assert torch.equal(out[~free], x[~free]) and not (out == V).any()
    # Even a denoiser that ignores SUBS (puts mass everywhere) cannot overwrite them.
    rogue = lambda z, t: torch.zeros(*z.shape, V + 1)  # noqa: E731
    out = ancestral(rogue, x, 3, mask_id=V, remasking=remasking, generator=g)
    assert torch.equal(out[~free], x[~free])
    pre, suf = torch.tensor([1, 2]), torch.tensor([3])
    c = canvas(L, V, 2, prefix=pre, suffix=suf)
    assert c.tolist() == [[1, 2, V, V, V, 3]] * 2


def test_cached_and_plain_samplers_agree_when_model_ignores_t():
    toy = CountToy(seed=5)
    calls = {"n": 0}

    def net(z, t):
        calls["n"] += 1
        return toy(z, t)

    denoiser = MaskedDiffusion(V).denoiser(net)
    x = canvas(L, V, 2)
    outs = {}
    for cache in (False, True):
        calls["n"] = 0
        outs[cache] = (ancestral(denoiser, x, 64, mask_id=V, cache=cache, generator=torch.Generator().manual_seed(7)), calls["n"])
    assert torch.equal(outs[True][0], outs[False][0])
    # A fresh output only after a step that revealed something: at most 1 + B * L calls.
    assert outs[False][1] == 64 and outs[True][1] <= 1 + 2 * L


def test_per_row_generators_make_a_batch_equal_single_rows():
    denoiser = MaskedDiffusion(V).denoiser(lambda z, t: CountToy(seed=6)(z, t))
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    batch = ancestral(denoiser, canvas(L, V, 3), 8, mask_id=V, generator=gens())
    rows = [ancestral(denoiser, canvas(L, V, 1), 8, mask_id=V, generator=[g]) for g in gens()]
    assert torch.equal(batch, torch.cat(rows))


def test_semi_autoregressive_extends_beyond_the_window():
    seen = []

    def denoiser(z, t):
        seen.append(z.shape[1])
        return subs_log_probs(torch.zeros(*z.shape, V), z, V)

    prompt = torch.tensor([[1, 2, 3]])
    out = semi_autoregressive(denoiser, prompt, 20, window=8, stride=3, num_steps=4, mask_id=V,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 20) and torch.equal(out[:, :3], prompt) and not (out == V).any()
    assert max(seen) <= 8


def test_gumbel_sampling_matches_softmax():
    logp = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    draws = gumbel_argmax(logp.expand(30000, 3), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 30000
    assert (freq - torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)).abs().max() < 0.01
    assert torch.equal(gumbel_argmax(logp.expand(4, 3), temperature=0), torch.zeros(4, dtype=torch.long))


def test_label_guidance_on_logits_with_the_shared_wrapper():
    from ditkit.models.text_dit import build_text_dit
    from ditkit.samplers.guidance import classifier_free_guidance

    model = build_text_dit("TextDiT-T", V, hidden_size=16, depth=1, num_heads=2, num_classes=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    z = canvas(L, V, 3)
    z[:, 2] = 1
    y, t = torch.tensor([0, 1, 1]), torch.ones(3)
    cond, uncond = model(z, 1000 * t, y), model(z, 1000 * t, torch.full((3,), 2))
    guided = classifier_free_guidance(model, y, 3.0, null_class=2)(z, 1000 * t)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    logp = MaskedDiffusion(V).denoiser(classifier_free_guidance(model, y, 3.0, null_class=2))(z, t)
    assert torch.isneginf(logp[..., V]).all() and torch.equal(logp[:, 2].argmax(-1), torch.ones(3, dtype=torch.long))

"""Block diffusion (BD3-LM, issue 23): the two-pass training mask matches block-by-block sampling,
the limits block_size = L (MDLM) and block_size = 1 (autoregressive) hold on the loss, the clipped
schedule, the block sampler with and without its KV cache, and a tiny run through the trainer."""

import pytest
import torch

from ditkit.config import ConfigError
from ditkit.diffusion.block import BlockDiffusion
from ditkit.diffusion.masked import MaskedDiffusion
from ditkit.eval.text import block_diffusion_bound, text_likelihood
from ditkit.models.text_dit import KVCache, TextDiT, two_pass_mask
from ditkit.registry import OBJECTIVES, SAMPLERS
from ditkit.samplers.block import block_diffusion
from ditkit.samplers.masked import ancestral

V, MASK = 11, 11


def random_model(num_classes: int = 0, seed: int = 0) -> TextDiT:
    torch.manual_seed(seed)
    model = TextDiT(V, hidden_size=32, depth=2, num_heads=2, num_classes=num_classes).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero output: randomise everything
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_registered_for_text_with_its_sampler_family():
    entry = OBJECTIVES.get("block")
    assert entry.modality == "text" and entry.family == "block" and entry.obj is BlockDiffusion
    assert SAMPLERS.names(family="block") == ["block"]


def test_two_pass_mask_is_the_papers():
    m = two_pass_mask(4, 2).int()  # [x_t (4), x0 (4)]: rows query, columns key
    want = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: itself only
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1: itself and clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: itself
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1: clean blocks 0 and 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(m, want)


def test_two_pass_logits_equal_block_by_block_with_and_without_cache():
    model = random_model()
    x0 = torch.randint(0, V, (3, 12))
    z = torch.where(torch.rand(3, 12, generator=torch.Generator().manual_seed(0)) < 0.5, MASK, x0)
    two = model(z, None, clean=x0, block_size=4)
    for b in range(3):
        seq = torch.cat([x0[:, : 4 * b], z[:, 4 * b : 4 * b + 4]], 1)
        alone = model(seq, None, block_size=4)[:, -4:]  # block-causal over context + noisy block
        cache = KVCache(block_size=4)
        with torch.no_grad(), model.use_kv_cache(cache):
            for j in range(b):
                model(x0[:, 4 * j : 4 * j + 4])
            with cache.storing(False):
                cached = model(z[:, 4 * b : 4 * b + 4])
        torch.testing.assert_close(two[:, 4 * b : 4 * b + 4], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached, alone, atol=1e-5, rtol=1e-5)


def test_block_size_L_is_mdlm():
    model = random_model()
    x0 = torch.randint(0, V, (4, 8))
    t = torch.tensor([0.2, 0.5, 0.7, 1.0])
    mdlm = MaskedDiffusion(V)
    z = mdlm.mask_tokens(x0, t, torch.Generator().manual_seed(0))
    want = mdlm.loss_terms(model, x0, None, t=t, z_t=z)
    got = BlockDiffusion(V, block_size=8).loss_terms(model, x0, None, t=t.unsqueeze(1), z_t=z)
    torch.testing.assert_close(got["nll"], want["nll"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-5, rtol=1e-5)


def test_block_size_1_is_autoregressive():
    """One token per block: a masked token sees exactly the clean tokens before it, so with every
    token masked at t = 1 the loss is the sequential next-token NLL."""
    model = random_model()
    x0 = torch.randint(0, V, (2, 6))
    obj = BlockDiffusion(V, block_size=1, eps=0.0)
    nll = obj.loss_terms(model, x0, None, t=torch.ones(2, 6), z_t=torch.full_like(x0, MASK))["nll"]
    ar = torch.zeros(2)
    for i in range(6):
        seq = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], 1)
        logp = model(seq, None, block_size=1)[:, -1].log_softmax(-1)
        ar -= logp.gather(1, x0[:, i : i + 1]).squeeze(1)
    torch.testing.assert_close(nll, ar, atol=1e-4, rtol=1e-5)
    # any t: an unmasked token adds nothing, a masked one adds its next-token NLL / t
    t = torch.full((2, 6), 0.5)
    z = x0.clone()
    z[:, 3] = MASK
    part = obj.loss_terms(model, x0, None, t=t, z_t=z)["nll"]
    logp = model(torch.cat([x0[:, :3], torch.full((2, 1), MASK)], 1), None, block_size=1)[:, -1].log_softmax(-1)
    torch.testing.assert_close(part, -logp.gather(1, x0[:, 3:4]).squeeze(1) / 0.5, atol=1e-4, rtol=1e-5)


def test_count_form_limits():
    model = random_model()
    x0 = torch.randint(0, V, (3, 8))
    n = torch.tensor([1, 4, 8])
    mdlm = MaskedDiffusion(V).count_form_nll(model, x0, None, torch.Generator().manual_seed(0), num_masked=n)
    one_block = BlockDiffusion(V, block_size=8).count_form_nll(model, x0, None, torch.Generator().manual_seed(0),
                                                               num_masked=n[:, None])
    torch.testing.assert_close(one_block, mdlm, atol=1e-4, rtol=1e-5)
    # block size 1: one mask per block, weight 1 -- the exact sequential NLL, and the bound says so
    obj = BlockDiffusion(V, block_size=1, eps=0.0)
    exact = obj.loss_terms(model, x0, None, t=torch.ones(3, 8), z_t=torch.full_like(x0, MASK))["nll"]
    torch.testing.assert_close(obj.count_form_nll(model, x0, None), exact, atol=1e-4, rtol=1e-5)
    lik = block_diffusion_bound(obj, model, x0, num_passes=4, include_prior=False)
    assert lik.exact and lik.num_passes == 1
    assert abs(lik.bits_per_token - float(exact.detach().sum()) / 24 / 0.6931471805599453) < 1e-4


def test_clipped_times_and_masks():
    obj = BlockDiffusion(V, block_size=4, noise_min=0.3, noise_max=0.8)
    t = obj.sample_times(64, 16, torch.Generator().manual_seed(0))
    assert t.shape == (64, 4) and float(t.min()) >= 0.3 and float(t.max()) <= 0.8
    full = obj.sample_times(64, 16, torch.Generator().manual_seed(0), clipped=False)
    assert float(full.min()) < 0.01 and float(full.max()) > 0.99  # stratified over 256 draws
    x0 = torch.zeros(2000, 8, dtype=torch.long)
    z = obj.mask_tokens(x0, torch.tensor([[0.25, 0.75]]).expand(2000, 2), torch.Generator().manual_seed(1))
    rates = (z == MASK).float().mean(0)
    assert abs(float(rates[:4].mean()) - 0.25) < 0.02 and abs(float(rates[4:].mean()) - 0.75) < 0.02
    with pytest.raises(ValueError, match="multiple"):
        obj.sample_times(2, 10)


def test_global_draws_reproduce_the_loss():
    model = random_model()
    obj = BlockDiffusion(V, block_size=4, noise_min=0.3, noise_max=0.8)
    x0 = torch.randint(0, V, (4, 8))
    own = obj.loss(model, x0, None, generator=torch.Generator().manual_seed(3))
    draws = obj.global_draws(x0[2:], 4, slice(2, 4), torch.Generator().manual_seed(3))
    torch.testing.assert_close(obj.loss(model, x0[2:], None, **draws), own[2:])


def test_bound_is_finite_and_refuses_wrong_models():
    model = random_model()
    obj = BlockDiffusion(V, block_size=4)
    tokens = torch.randint(0, V, (8, 8))
    lik = text_likelihood(obj, model, tokens, num_passes=3, generator=torch.Generator().manual_seed(0))
    assert lik.num_passes == 3 and not lik.exact and 0 < lik.bits_per_char < 50
    assert lik.bits_per_char == block_diffusion_bound(obj, model, tokens, num_passes=3,
                                                      generator=torch.Generator().manual_seed(0)).bits_per_char
    with pytest.raises(ValueError, match="bidirectional"):
        obj.loss(TextDiT(V, hidden_size=32, depth=1, num_heads=2, causal=True), tokens, None)
    with pytest.raises(ValueError, match="time_conditioning"):
        obj.loss(TextDiT(V, hidden_size=32, depth=1, num_heads=2, time_conditioning=True), tokens, None)


def sample(model, obj, prefix, n, use_cache, context_len=16, seed=0, **options):
    cache = KVCache(obj.block_size)
    with model.use_kv_cache(cache):
        den = obj.denoiser(lambda x, t: model(x, t, None), cache, context_len=context_len, use_cache=use_cache)
        out = block_diffusion(den, prefix, n, block_size=obj.block_size, num_steps=3, mask_id=MASK,
                              generator=torch.Generator().manual_seed(seed), **options)
    return out, den.calls


@pytest.mark.parametrize("prompt_len", [0, 5])
def test_sampler_same_tokens_with_and_without_cache_any_length(prompt_len):
    model, obj = random_model(), BlockDiffusion(V, block_size=4)
    prefix = torch.randint(0, V, (2, prompt_len))
    cached, _ = sample(model, obj, prefix, 30, True)  # 30 + 5 > context 16: the window slides
    plain, _ = sample(model, obj, prefix, 30, False)
    assert cached.shape == (2, prompt_len + 30) and not (cached == MASK).any()
    assert torch.equal(cached[:, :prompt_len], prefix)
    assert torch.equal(cached, plain)


def test_cache_runs_fewer_tokens_through_the_network():
    model, obj = random_model(), BlockDiffusion(V, block_size=4)
    counted = {"tokens": 0}

    def net(x, t):
        counted["tokens"] += x.numel()
        return model(x, t, None)

    for use_cache in (True, False):
        counted["tokens"] = 0
        cache = KVCache(4)
        with model.use_kv_cache(cache):
            den = obj.denoiser(net, cache, context_len=64, use_cache=use_cache)
            block_diffusion(den, torch.zeros(1, 0, dtype=torch.long), 32, block_size=4, num_steps=4, mask_id=MASK,
                            generator=torch.Generator().manual_seed(0))
        counted[use_cache] = counted["tokens"]
    assert counted[True] * 3 < counted[False]


def test_one_block_equals_the_masked_sampler():
    model = random_model()
    obj = BlockDiffusion(V, block_size=8)
    out, _ = sample(model, obj, torch.zeros(2, 0, dtype=torch.long), 8, True, context_len=16)
    mdlm = MaskedDiffusion(V).denoiser(lambda x, t: model(x, t, None))
    want = ancestral(mdlm, torch.full((2, 8), MASK), 3, mask_id=MASK, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, want)


def test_stops_at_the_stop_token_and_keeps_template_tokens():
    model = random_model()
    obj = BlockDiffusion(V, block_size=2)
    with torch.no_grad():  # make token 3 overwhelmingly likely everywhere: every row stops in block 0
        model.final_layer.linear.bias[3] = 100.0
    out, _ = sample(model, obj, torch.zeros(2, 0, dtype=torch.long), 20, True, stop_id=3)
    assert out.shape == (2, 2) and (out == 3).any(1).all()
    template = torch.tensor([[1, 2, MASK, 4, MASK, MASK, 7]])
    with torch.no_grad():
        model.final_layer.linear.bias[3] = 0.0
    filled, _ = sample(model, obj, template, 0, True)
    keep = template != MASK
    assert filled.shape == template.shape and torch.equal(filled[keep], template[keep]) and not (filled == MASK).any()


def test_from_config_checks_block_size():
    from ditkit.recipes import get_recipe

    cfg = get_recipe("text_sums")
    cfg.objective.kind, cfg.data.vocab_size = "block", 14
    assert BlockDiffusion.from_config(cfg).block_size == 12  # block_size None: the largest divisor of 24 <= 16
    cfg.objective.block_size = 5
    with pytest.raises(ConfigError, match="block_size=5 must divide data.seq_len=24"):
        BlockDiffusion.from_config(cfg)


def test_tiny_run_through_the_trainer_and_pipeline(tmp_path):
    from ditkit.pipelines import load
    from ditkit.recipes import get_recipe
    from ditkit.train.loop import train

    cfg = get_recipe("text_sums")
    cfg.objective.kind = "block"
    cfg.train.max_steps, cfg.train.ckpt_every = 20, 20
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), "bd3"
    result = train(cfg, log=lambda message: None)
    pipe = load(result.run_dir, device="cpu")
    assert pipe.sampler_name == "block" and pipe.objective.block_size == 12
    a = pipe("12+", num_samples=2, num_inference_steps=3)
    b = pipe("12+", num_samples=2, num_inference_steps=3, kv_cache=False)
    assert torch.equal(a.tokens, b.tokens) and all(text.startswith("12+") for text in a.texts)
    longer = pipe(num_samples=1, num_tokens=60, num_inference_steps=2)  # beyond the 24-token window
    assert longer.tokens.shape == (1, 60)
    infill = pipe(infill="3+4=__", num_samples=2, num_inference_steps=3)
    assert all(text.startswith("3+4=") and len(text) == 6 for text in infill.texts)
    with pytest.raises(ConfigError, match="suffix"):
        pipe("1+", suffix="=3")


# ---- ReMDM remasking (an option of the masked sampler) ------------------------------------------


def test_remdm_zero_is_mdlm_and_positive_eta_remasks_generated_tokens_only():
    model = random_model()
    den = MaskedDiffusion(V).denoiser(lambda x, t: model(x, t, None))
    x = torch.full((4, 10), MASK)
    x[:, :3] = torch.tensor([1, 2, 3])
    plain = ancestral(den, x, 8, mask_id=MASK, generator=torch.Generator().manual_seed(0))
    off = ancestral(den, x, 8, mask_id=MASK, remdm_eta=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, off)
    remasked = {"n": 0}

    def watch(i, z, x0):
        if i > 0:
            remasked["n"] += int(((watch.prev != MASK) & (z == MASK)).sum())
        assert torch.equal(z[:, :3], x[:, :3])  # the prompt is never remasked
        watch.prev = z.clone()

    out = ancestral(den, x, 8, mask_id=MASK, remdm_eta=0.5, generator=torch.Generator().manual_seed(0), callback=watch)
    assert remasked["n"] > 0 and not (out == MASK).any() and torch.equal(out[:, :3], x[:, :3])
    with pytest.raises(ValueError, match="random"):
        ancestral(den, x, 8, mask_id=MASK, remdm_eta=0.1, remasking="low_confidence")


def test_remdm_keeps_the_forward_marginals():
    """With a denoiser that always proposes token 0, the masked fraction after each step must be
    the forward process's s (alpha_s = 1 - s), with or without remasking."""
    L, steps = 4000, 5

    def den(z, t):
        logp = torch.full((*z.shape, V + 1), -float("inf"))
        logp[..., 0] = 0.0
        return logp

    for eta in (0.0, 0.3):
        fractions = []
        ancestral(den, torch.full((1, L), MASK), steps, mask_id=MASK, remdm_eta=eta, remdm_schedule="cap",
                  generator=torch.Generator().manual_seed(0),
                  callback=lambda i, z, x0: fractions.append(float((z == MASK).float().mean())))
        want = [1 - (i + 1) / steps for i in range(steps)]
        assert max(abs(a - b) for a, b in zip(fractions, want)) < 0.03, (eta, fractions)

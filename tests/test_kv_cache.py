"""KV cache of the token DiT: cached forwards equal full forwards, and the cached autoregressive
sampler draws the same tokens as the uncached one (issue 23)."""

import pytest
import torch

from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.models.text_dit import KVCache, TextDiT
from ditkit.samplers.autoregressive import autoregressive, cached_next_token
from ditkit.samplers.guidance import classifier_free_guidance

V = 11


def random_model(causal: bool, num_classes: int = 0, seed: int = 0) -> TextDiT:
    torch.manual_seed(seed)
    model = TextDiT(V, hidden_size=32, depth=2, num_heads=2, causal=causal, num_classes=num_classes).eval()
    for p in model.parameters():  # a fresh TextDiT outputs zeros (adaLN-Zero): randomise everything
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_causal_cache_continues_the_sequence_exactly():
    model = random_model(causal=True)
    x = torch.randint(0, V, (3, 12))
    full = model(x)
    cache = KVCache()
    with torch.no_grad(), model.use_kv_cache(cache):
        parts = [model(x[:, :5])] + [model(x[:, i : i + 1]) for i in range(5, 12)]
    assert cache.length == 12 and len(cache.keys) == 2 and cache.keys[0].shape == (3, 2, 12, 16)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_read_only_pass_leaves_the_cache_unchanged():
    model = random_model(causal=True)
    x = torch.randint(0, V, (2, 6))
    cache = KVCache()
    with torch.no_grad(), model.use_kv_cache(cache):
        model(x[:, :4])
        with cache.storing(False):
            once = model(x[:, 4:])
            twice = model(x[:, 4:])
    assert cache.length == 4 and cache.keys[0].shape[2] == 4
    torch.testing.assert_close(once, twice)
    torch.testing.assert_close(once, model(x)[:, 4:], atol=1e-5, rtol=1e-5)


def test_model_without_a_bound_cache_is_unchanged():
    model = random_model(causal=True)
    x = torch.randint(0, V, (2, 6))
    before = model(x)
    with model.use_kv_cache(KVCache()):
        pass
    assert model._kv_cache is None
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("context_len", [40, 9])  # 9: the window slides past it, re-encoded each step
def test_cached_autoregressive_sampler_draws_the_same_tokens(context_len):
    model = random_model(causal=True)
    objective = AutoregressiveLM(V)
    net = lambda x, t: model(x, t, None)  # noqa: E731
    prefix = torch.randint(0, V, (3, 4))
    plain = autoregressive(objective.denoiser(net, context_len), prefix, 20, generator=torch.Generator().manual_seed(1))
    cache = KVCache()
    with model.use_kv_cache(cache):
        fn = cached_next_token(net, cache, bos_id=objective.bos_id, context_len=context_len)
        cached = autoregressive(fn, prefix, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, cached)
    assert cache.length == min(24, context_len)  # BOS + every token but the last drawn, or a full window


def test_cache_works_under_classifier_free_guidance():
    model = random_model(causal=True, num_classes=3)
    objective = AutoregressiveLM(V)
    y = torch.tensor([0, 2])
    net = classifier_free_guidance(model, y, 2.0, null_class=3)  # doubles the batch inside
    prefix = torch.randint(0, V, (2, 3))
    plain = autoregressive(objective.denoiser(net, 64), prefix, 12, generator=torch.Generator().manual_seed(0))
    cache = KVCache()
    with model.use_kv_cache(cache):
        cached = autoregressive(cached_next_token(net, cache, bos_id=V, context_len=64), prefix, 12,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, cached)
    assert cache.keys[0].shape[0] == 4  # conditional and unconditional halves cached together


def test_a_new_sequence_resets_the_cache():
    model = random_model(causal=True)
    cache = KVCache()
    with model.use_kv_cache(cache):
        fn = cached_next_token(lambda x, t: model(x, t, None), cache, bos_id=V, context_len=32)
        fn(torch.randint(0, V, (1, 8)))
        other = torch.randint(0, V, (1, 3))
        got = fn(other)
    want = AutoregressiveLM(V).denoiser(lambda x, t: model(x, t, None), 32)(other)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_layout_is_refused_on_a_causal_model():
    with pytest.raises(ValueError, match="causal"):
        with random_model(causal=True).use_kv_cache(KVCache(block_size=4)):
            pass


def test_pipeline_autoregressive_same_text_with_and_without_cache(tmp_path):
    from ditkit.pipelines import load
    from ditkit.recipes import get_recipe
    from ditkit.train.loop import train

    cfg = get_recipe("text_sums")
    cfg.objective.kind = "autoregressive"
    cfg.train.max_steps, cfg.train.ckpt_every = 20, 20
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), "ar"
    pipe = load(train(cfg, log=lambda message: None).run_dir, device="cpu")
    for num_tokens in (20, 40):  # 40: past the 24-token training window
        cached = pipe("1+", num_samples=3, num_tokens=num_tokens)
        plain = pipe("1+", num_samples=3, num_tokens=num_tokens, kv_cache=False)
        assert cached.tokens.shape == (3, 1 + num_tokens) and torch.equal(cached.tokens, plain.tokens)

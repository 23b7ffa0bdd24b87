"""Step caching (issue 21, models/caching.py): FORA and TeaCache around the block stack are exact when
the knob says "never reuse", really skip the blocks when they reuse (counted by hooks), reuse the
cond/uncond halves of guidance together, reset per batch, and reach the pipelines' call and metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.errors import ConfigError
from ditkit.models.caching import FORACache, TeaCache, attach_step_cache, make_step_cache
from ditkit.models.dit import build_dit
from ditkit.models.text_dit import build_text_dit

FIXTURES = Path(__file__).parent / "fixtures" / "outputs"


def _random_dit(**overrides) -> torch.nn.Module:
    """A tiny DiT whose blocks do something (adaLN-Zero init would make them the identity)."""
    torch.manual_seed(0)
    model = build_dit("DiT-T/4", input_size=8, in_channels=1, num_classes=3, learn_sigma=False, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class BlockCounter:
    """Counts attention and MLP forwards of every block and the batch sizes they saw."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.attn = self.mlp = 0
        self.batches: list[int] = []
        self.handles = []
        for block in model.blocks:
            self.handles.append(block.attn.register_forward_hook(self._attn))
            self.handles.append(block.mlp.register_forward_hook(self._mlp))

    def _attn(self, module, inputs, output) -> None:
        self.attn += 1
        self.batches.append(inputs[0].shape[0])

    def _mlp(self, module, inputs, output) -> None:
        self.mlp += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _trajectory(model, cache, num_calls=6, batch=2, seed=0):
    """``num_calls`` calls on a slowly moving input (a sampler's view), outputs stacked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    drift = torch.randn(batch, 1, 8, 8, generator=g)
    y = torch.arange(batch) % 3
    outs = []
    with torch.no_grad(), attach_step_cache(model, cache):
        for k in range(num_calls):
            t = torch.full((batch,), 900.0 - 150.0 * k)
            outs.append(model(x + 0.02 * k * drift, t, y))
    return torch.stack(outs)


@pytest.mark.parametrize("spec", ["fora:1", "teacache:0"])
def test_never_reuse_is_bitwise_the_uncached_model(spec):
    model = _random_dit()
    plain = _trajectory(model, None)
    cache = make_step_cache(spec)
    cached = _trajectory(model, cache)
    assert torch.equal(plain, cached)
    assert cache.calls == 6 and cache.reused == 0
    assert model.step_cache is None  # detached after the block


def test_fora_runs_the_blocks_every_interval_and_reuses_in_between():
    model = _random_dit()
    plain = _trajectory(model, None)
    counter = BlockCounter(model)
    cache = FORACache(3)
    cached = _trajectory(model, cache)
    counter.close()
    depth = len(model.blocks)
    assert counter.attn == counter.mlp == 2 * depth  # calls 0 and 3 of 6 computed
    assert cache.reused == 4 and cache.calls == 6
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[3], plain[3])
    # reused calls differ from the exact ones, but only a little: the input moved little
    err = (cached[1] - plain[1]).abs().max()
    assert 0 < err < 0.5 * plain[1].abs().max()


def test_teacache_reuses_while_the_accumulated_change_is_below_the_threshold():
    model = _random_dit()
    # the same input twice: zero change, so the second call reuses the residual and is exact
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])
    cache = TeaCache(0.05)
    counter = BlockCounter(model)
    with torch.no_grad(), attach_step_cache(model, cache):
        first, again = model(x, t, y), model(x, t, y)
        moved = model(x + 3.0 * torch.randn_like(x), t * 0.2, y)  # a large change: computed
    counter.close()
    assert cache.reused == 1 and counter.attn == 2 * len(model.blocks)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
    assert moved.shape == first.shape  # the moved call ran the blocks (2 computed calls counted above)
    # a huge threshold reuses every call after the first
    huge = TeaCache(1e9)
    counter = BlockCounter(model)
    _trajectory(model, huge, num_calls=5)
    counter.close()
    assert huge.reused == 4 and counter.attn == len(model.blocks)


def test_guidance_halves_are_reused_together_and_batches_reset():
    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    kwargs = dict(class_labels=[0, 1, 2, 3], num_samples=4, sampler="ddim", num_inference_steps=6,
                  guidance_scale=2.0, seed=3)
    plain = pipe(**kwargs)
    counter = BlockCounter(pipe.model)
    exact = pipe(**kwargs, cache="fora:1")
    fora = pipe(**kwargs, cache="fora:2", batch_size=4)
    counter.close()
    assert torch.equal(exact.tensors, plain.tensors)
    depth = len(pipe.model.blocks)
    assert counter.attn == (6 + 3) * depth  # exact: 6 calls; fora:2: calls 0, 2, 4
    assert set(counter.batches) == {8}  # cond and uncond halves in one batch of 2B, never split
    assert fora.metadata["cache"] == "fora:2" and fora.metadata["cache_reuse"] == "reused 3 of 6 network calls"
    assert "cache" not in plain.metadata
    assert not torch.equal(fora.tensors, plain.tensors)
    # the cache is reset per batch: a FORA sample does not depend on the batch it was drawn in
    split = pipe(**kwargs, cache="fora:2", batch_size=2)
    torch.testing.assert_close(split.tensors, fora.tensors, atol=1e-5, rtol=0)
    tea = pipe(**kwargs, cache="teacache:0")
    assert torch.equal(tea.tensors, plain.tensors) and tea.metadata["cache"] == "teacache:0"


def test_text_dit_masked_sampler_with_the_cache():
    pipe = ditkit.load(FIXTURES / "text_ckpt", device="cpu")
    plain = pipe("12+", num_inference_steps=8, num_samples=2, seed=7)
    exact = pipe("12+", num_inference_steps=8, num_samples=2, seed=7, cache="teacache:0")
    assert torch.equal(exact.tokens, plain.tokens) and exact.metadata["cache"] == "teacache:0"
    counter = BlockCounter(pipe.model)
    reusing = pipe("12+", num_inference_steps=8, num_samples=2, seed=7, cache="fora:4")
    counter.close()
    calls = int(reusing.metadata["cache_reuse"].split()[-3])
    reused = int(reusing.metadata["cache_reuse"].split()[1])
    assert reused > 0 and counter.attn == (calls - reused) * len(pipe.model.blocks)
    model = build_text_dit("TextDiT-T", vocab_size=11)
    assert model.step_cache is None


def test_bad_specs_and_models_without_the_hook_are_refused():
    assert make_step_cache(None) is None and make_step_cache("none") is None
    assert make_step_cache("fora:3").interval == 3 and make_step_cache("teacache:0.2").threshold == 0.2
    for spec, match in (("fora:0", "interval"), ("teacache:-1", "threshold"), ("deepcache:2", "unknown cache"),
                        ("fora:x", "not a number")):
        with pytest.raises(ConfigError, match=match):
            make_step_cache(spec)
    with pytest.raises(ConfigError, match="no step-cache hook"):
        attach_step_cache(torch.nn.Linear(2, 2), FORACache(2))
    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    with pytest.raises(ConfigError, match="fora:N"):
        pipe(class_labels=[0], num_inference_steps=2, cache="fast")

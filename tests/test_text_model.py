"""TextDiT: shapes, presets, time conditioning on/off, causal vs bidirectional attention, labels, RoPE."""

import pytest
import torch

from ditkit.models.text_dit import TEXT_DIT_PRESETS, TextDiT, build_text_dit, text_forward_macs

V = 11


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised adaLN/final layers would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny(**kw) -> TextDiT:
    return build_text_dit("TextDiT-T", V, hidden_size=32, depth=2, num_heads=2, **kw)


def test_shapes_init_and_mask_embedding():
    model = tiny()
    x = torch.randint(0, V + 1, (3, 9))  # ids up to the mask id V
    out = model(x, torch.zeros(3))
    assert out.shape == (3, 9, V)  # no output for the mask id
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer: uniform logits at start
    assert model.tok_embedder.num_embeddings == V + 1 and model.mask_id == V
    with pytest.raises(ValueError, match="int64 token ids"):
        model(x.float(), torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.zeros(3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(TEXT_DIT_PRESETS))
def test_presets_build_and_size(name):
    device = torch.device("cpu") if name == "TextDiT-T" else torch.device("meta")
    with device:
        model = build_text_dit(name, 50257)
        out = model(torch.zeros(1, 8, dtype=torch.long), None)
    assert out.shape == (1, 8, 50257)
    if name == "TextDiT-B":  # 12 x 768: the GPT-2-small / MDLM backbone
        blocks = sum(p.numel() for p in model.blocks.parameters())
        assert len(model.blocks) == 12 and model.hidden_size == 768
        assert 120e6 < blocks < 130e6  # 12 * 18 * 768^2 incl. adaLN (~85M without it)
    assert text_forward_macs(model, 8) > 0


def test_time_conditioning_off_ignores_t_and_on_uses_it():
    x = torch.randint(0, V + 1, (2, 7))
    plain = randomise(tiny(time_conditioning=False))
    assert plain.t_embedder is None
    torch.testing.assert_close(plain(x, torch.tensor([0.0, 10.0])), plain(x, torch.tensor([900.0, 500.0])))
    torch.testing.assert_close(plain(x, None), plain(x, torch.zeros(2)))
    timed = randomise(tiny(time_conditioning=True))
    assert not torch.allclose(timed(x, torch.zeros(2)), timed(x, torch.full((2,), 500.0)))
    with pytest.raises(ValueError, match="time-conditioned"):
        timed(x, None)


def test_causal_flag_controls_information_flow():
    x = torch.randint(0, V, (1, 8))
    x2 = x.clone()
    x2[0, 5] = (x2[0, 5] + 1) % V  # change one token at position 5
    causal = randomise(tiny(causal=True))
    a, b = causal(x, None), causal(x2, None)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # earlier positions cannot see position 5
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    bidir = randomise(tiny(causal=False))
    assert not torch.allclose(bidir(x, None)[:, :5], bidir(x2, None)[:, :5])


def test_positions_through_rope_and_longer_inputs():
    model = randomise(tiny(max_seq_len=8))
    x = torch.randint(0, V, (1, 6))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # Without positions a bidirectional transformer is permutation-equivariant; RoPE breaks that.
    assert not torch.allclose(model(x[:, perm], None), model(x, None)[:, perm])
    long = model(torch.full((1, 12), 3), None)  # beyond the cached table: recomputed, prefix consistent
    assert long.shape == (1, 12, V) and torch.isfinite(long).all()


def test_labels_and_dropout_to_null_class():
    model = randomise(tiny(num_classes=3, class_dropout_prob=1.0))
    x = torch.randint(0, V, (2, 5))
    y = torch.tensor([0, 2])
    assert not torch.allclose(model(x, None, y)[0], model(x, None, torch.tensor([1, 2]))[0])
    null = model(x, None, torch.full((2,), 3))
    model.train()  # dropout 1.0: every label becomes the null class
    torch.testing.assert_close(model(x, None, y), null)
    with pytest.raises(ValueError, match="label-conditional"):
        model(x, None)

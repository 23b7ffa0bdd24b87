"""Cross-attention DiT (PixArt-alpha): shapes, padding mask, adaLN-single, options, presets, and the
same output as diffusers' PixArtTransformer2DModel after the key map."""

import pytest
import torch

from ditkit.errors import ConfigError
from ditkit.models.cross_dit import (
    CROSS_DIT_PRESETS,
    CrossDiT,
    build_cross_dit,
    diffusers_config,
    from_diffusers_state_dict,
    kwargs_from_diffusers_config,
    to_diffusers_state_dict,
)
from ditkit.models.dit import count_params
from ditkit.models.text_encoder import PromptCondition
from ditkit.registry import MODEL_FAMILIES

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, caption_channels=24)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace the zero-initialised parameters too, so every path contributes to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(B=3, L=5, C=3, size=8, D_text=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, size, size, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0][:B])
    states = torch.randn(B, L, D_text, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False  # caption 0 has 3 real tokens, caption 1 has 1
    mask[1, 1:] = False
    return x, t, PromptCondition(states, mask)


def test_forward_shape_and_learn_sigma():
    model = CrossDiT(**TINY).eval()
    x, t, cond = _inputs()
    assert model(x, t, cond).shape == (3, 6, 8, 8)
    model = CrossDiT(**TINY, learn_sigma=False).eval()
    assert model(x, t, cond).shape == (3, 3, 8, 8)


def test_padding_is_ignored_and_real_tokens_matter():
    model = CrossDiT(**TINY).eval()
    _randomise(model)
    x, t, cond = _inputs()
    out = model(x, t, cond)
    # Change what sits in the padding: the output must not move.
    states = cond.encoder_hidden_states.clone()
    states[0, 3:] = 100.0
    states[1, 1:] = -50.0
    assert torch.allclose(model(x, t, PromptCondition(states, cond.encoder_attention_mask)), out, atol=1e-5)
    # Longer padding (the batched guidance case): still the same output.
    longer = PromptCondition.cat([cond, PromptCondition(torch.zeros(1, 9, 24), torch.zeros(1, 9, dtype=torch.bool))])
    assert torch.allclose(model(x, t, PromptCondition(longer[0][:3], longer[1][:3])), out, atol=1e-5)
    # Change a real token: the output of that sample (and only it) moves.
    states = cond.encoder_hidden_states.clone()
    states[0, 0] += 1.0
    moved = model(x, t, PromptCondition(states, cond.encoder_attention_mask))
    assert (moved[0] - out[0]).abs().max() > 1e-3
    assert torch.allclose(moved[1:], out[1:], atol=1e-6)
    # Integer 0/1 masks read the same as bool.
    assert torch.allclose(model(x, t, PromptCondition(cond[0], cond[1].long())), out, atol=1e-6)


def test_all_padding_caption_gives_finite_output():
    model = CrossDiT(**TINY).eval()
    _randomise(model)
    x, t, cond = _inputs()
    empty = PromptCondition(cond[0], torch.zeros_like(cond[1]))
    assert torch.isfinite(model(x, t, empty)).all()


def test_adaln_single_shares_one_projection_and_time_matters():
    model = CrossDiT(**TINY)
    # One t_block for the whole model (adaLN-single), a (6, D) table per block, no per-block adaLN MLP.
    assert model.t_block[1].weight.shape == (6 * 32, 32)
    assert all(b.scale_shift_table.shape == (6, 32) for b in model.blocks)
    assert not any("adaLN_modulation" in k for k in model.state_dict())
    model.eval()
    _randomise(model)
    x, _, cond = _inputs()
    a = model(x, torch.full((3,), 10.0), cond)
    b = model(x, torch.full((3,), 900.0), cond)
    assert (a - b).abs().max() > 1e-3


def test_init_cross_attention_and_output_start_at_zero():
    model = CrossDiT(**TINY).eval()
    x, t, cond = _inputs()
    assert model(x, t, cond).abs().max() == 0  # zero final Linear
    assert all(b.cross_attn.proj.weight.abs().max() == 0 for b in model.blocks)


@pytest.mark.parametrize("options", [
    dict(qk_norm=True), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(pos_embed="rope"),
    dict(qk_norm=True, norm="rmsnorm", mlp="swiglu", pos_embed="rope"),
])
def test_options_run_and_train(options):
    model = CrossDiT(**TINY, **options)
    _randomise(model)
    x, t, cond = _inputs()
    out = model(x, t, cond)
    assert out.shape == (3, 6, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rope_uses_positions_without_a_table():
    model = CrossDiT(**TINY, pos_embed="rope").eval()
    _randomise(model)
    x, t, cond = _inputs()
    # Swapping two patches of the input must not just swap the outputs (positions are seen).
    flipped = model(x.flip(-1), t, cond).flip(-1)
    assert (flipped - model(x, t, cond)).abs().max() > 1e-3


def test_gradient_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    a = CrossDiT(**TINY)
    _randomise(a)
    b = CrossDiT(**TINY, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, t, cond = _inputs()
    la, lb = a(x, t, cond).square().mean(), b(x, t, cond).square().mean()
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_bad_inputs_raise():
    with pytest.raises(ConfigError, match="not divisible by patch size"):
        CrossDiT(**{**TINY, "input_size": 9})
    model = CrossDiT(**TINY)
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, PromptCondition(torch.zeros(3, 5, 7), None))
    with pytest.raises(ValueError, match="expects input"):
        model(x[:, :2], t, cond)


def test_registered_with_presets():
    entry = MODEL_FAMILIES.get("cross_dit")
    assert entry.obj is CrossDiT and entry.modality == "image"
    assert "PixArt-XL/2" in entry.presets and "CrossDiT-XS/2" in entry.presets
    tiny = build_cross_dit("CrossDiT-T/4", input_size=16, in_channels=3, caption_channels=64)
    assert tiny(torch.zeros(2, 3, 16, 16), torch.zeros(2), PromptCondition(torch.zeros(2, 4, 64))).shape == (2, 6, 16, 16)
    with pytest.raises(ConfigError, match="PixArt-XL/2"):
        build_cross_dit("PixArt-XXL/2")


def test_pixart_xl_parameter_count_matches_paper_and_diffusers():
    """PixArt-alpha reports 0.6B parameters for PixArt-XL/2; diffusers' model of the same config,
    built on the meta device (no memory), has exactly our count."""
    with torch.device("meta"):
        ours = build_cross_dit("PixArt-XL/2")
    n = count_params(ours)
    assert 600e6 < n < 620e6, n
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.PixArtTransformer2DModel(**{k: v for k, v in diffusers_config(ours).items() if k != "_class_name"})
    assert n == sum(p.numel() for p in ref.parameters())
    assert CROSS_DIT_PRESETS["PixArt-XL/2"]["depth"] == 28


def test_same_output_as_diffusers_pixart():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = CrossDiT(**TINY).eval()
    _randomise(ours)
    config = diffusers_config(ours)
    ref = diffusers.PixArtTransformer2DModel(**{k: v for k, v in config.items() if k != "_class_name"}).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    x, t, cond = _inputs()
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=cond[0], timestep=t, encoder_attention_mask=cond[1].long()).sample
        got = ours(x, t, cond)
    assert (got - expected).abs().max() < 1e-4
    # ...and back: diffusers weights load strictly into a CrossDiT built from the diffusers config.
    back = CrossDiT(**kwargs_from_diffusers_config(config)).eval()
    back.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x, t, cond), got)


def test_diffusers_export_refuses_options_it_lacks():
    with pytest.raises(ConfigError, match="can be exported"):
        to_diffusers_state_dict(CrossDiT(**TINY, qk_norm=True))
    with pytest.raises(ConfigError, match="use_additional_conditions"):
        kwargs_from_diffusers_config({"sample_size": 128, "caption_channels": 4096})


def test_cross_attention_maps_can_be_recorded_without_changing_the_output():
    model = CrossDiT(**TINY).eval()
    _randomise(model)
    x, t, cond = _inputs()
    out = model(x, t, cond)
    store: list = []
    for block in model.blocks:
        block.cross_attn.attention_store = store
    recorded = model(x, t, cond)
    assert torch.allclose(recorded, out, atol=1e-5)
    assert len(store) == 2 and store[0].shape == (3, 4, 16, 5)  # (B, heads, image tokens, text tokens)
    probs = store[0]
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 16), atol=1e-5)
    assert (probs[0, :, :, 3:] == 0).all() and (probs[1, :, :, 1:] == 0).all()  # nothing on padding
    assert (probs[1, :, :, 0] == 1).all()

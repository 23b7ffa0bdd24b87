"""MMDiT (SD3 joint attention): shapes, text tokens matter and padding does not, options, presets
and parameter counts against the paper and diffusers' SD3Transformer2DModel."""

import pytest
import torch

from ditkit.errors import ConfigError
from ditkit.models.dit import count_params
from ditkit.models.mmdit import MMDIT_PRESETS, MMDiT, build_mmdit
from ditkit.models.text_encoder import PromptCondition
from ditkit.registry import MODEL_FAMILIES

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=4,
            caption_channels=24, pooled_channels=None)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace the zero-initialised parameters too, so every path contributes to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(B=3, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0][:B])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 1:] = False
    return x, t, PromptCondition(torch.randn(B, L, 24, generator=g), mask)


def test_forward_shape():
    model = MMDiT(**TINY).eval()
    x, t, cond = _inputs()
    assert model(x, t, cond).shape == (3, 3, 8, 8)
    assert MMDiT(**TINY, learn_sigma=True)(x, t, cond).shape == (3, 6, 8, 8)


def test_text_tokens_influence_output_and_padding_does_not():
    model = MMDiT(**TINY).eval()
    _randomise(model)
    x, t, cond = _inputs()
    out = model(x, t, cond)
    states = cond.encoder_hidden_states.clone()
    states[0, 3:] = 100.0  # padding content
    states[1, 1:] = -30.0
    assert torch.allclose(model(x, t, PromptCondition(states, cond.encoder_attention_mask)), out, atol=1e-5)
    longer = PromptCondition.cat([cond, PromptCondition(torch.zeros(1, 9, 24), torch.zeros(1, 9, dtype=torch.bool))])
    assert torch.allclose(model(x, t, PromptCondition(longer[0][:3], longer[1][:3])), out, atol=1e-5)
    for token in (0, 2):  # a real token changes its sample only (via attention and the pooled mean)
        states = cond.encoder_hidden_states.clone()
        states[0, token] += 1.0
        moved = model(x, t, PromptCondition(states, cond.encoder_attention_mask))
        assert (moved[0] - out[0]).abs().max() > 1e-3
        assert torch.allclose(moved[1:], out[1:], atol=1e-6)


def test_text_reaches_the_image_through_attention_not_only_the_pooled_vector():
    model = MMDiT(**TINY).eval()
    _randomise(model)
    x, t, cond = _inputs()
    pooled = torch.randn(3, 24)
    out = model(x, t, PromptCondition(cond[0], cond[1], pooled))
    states = cond.encoder_hidden_states.clone()
    states[2, 4] -= 1.0
    moved = model(x, t, PromptCondition(states, cond[1], pooled))  # same pooled, different token
    assert (moved[2] - out[2]).abs().max() > 1e-3


def test_last_block_reads_text_only():
    model = MMDiT(**TINY)
    last, first = model.blocks[-1], model.blocks[0]
    assert last.context_pre_only and last.attn.context_proj is None and not hasattr(last, "context_mlp")
    assert not first.context_pre_only and first.attn.context_proj is not None
    assert isinstance(first.attn.q_norm, torch.nn.Module) and first.attn.q_norm.weight.shape == (8,)  # RMS QK-norm


def test_init_is_zero_output_and_identity_blocks():
    model = MMDiT(**TINY).eval()
    x, t, cond = _inputs()
    assert model(x, t, cond).abs().max() == 0


@pytest.mark.parametrize("options", [
    dict(qk_norm=False), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(pos_embed="rope"),
    dict(norm="rmsnorm", mlp="swiglu", pos_embed="rope"),
])
def test_options_run_and_train(options):
    model = MMDiT(**TINY, **options)
    _randomise(model)
    x, t, cond = _inputs()
    out = model(x, t, cond)
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_gradient_checkpointing_same_loss_and_grads():
    a = MMDiT(**TINY)
    _randomise(a)
    b = MMDiT(**TINY, grad_checkpointing=True)
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
        MMDiT(**{**TINY, "input_size": 9})
    model = MMDiT(**TINY)
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, PromptCondition(torch.zeros(3, 5, 7)))
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, PromptCondition(cond[0], cond[1], torch.zeros(3, 5)))
    with pytest.raises(ConfigError, match="MMDiT-d24/2"):
        build_mmdit("MMDiT-d25/2")


def test_registered_and_tiny_preset_builds():
    entry = MODEL_FAMILIES.get("mmdit")
    assert entry.obj is MMDiT and entry.modality == "image" and "MMDiT-d24/2" in entry.presets
    model = build_mmdit("MMDiT-T/4", input_size=16, in_channels=3, caption_channels=64)
    assert model(torch.zeros(2, 3, 16, 16), torch.zeros(2), PromptCondition(torch.zeros(2, 4, 64))).shape == (2, 3, 16, 16)


def test_paper_size_parameter_counts():
    """SD3 (Esser et al. 2024) sec. 5.2: depth 24 is the 2B model, depth 38 the 8B one. Built on the
    meta device (no memory); depth 24 equals diffusers' SD3Transformer2DModel with RMS QK-norm."""
    with torch.device("meta"):
        d24, d38 = build_mmdit("MMDiT-d24/2"), build_mmdit("MMDiT-d38/2")
    n24, n38 = count_params(d24), count_params(d38)
    assert 1.9e9 < n24 < 2.2e9, n24
    assert 7.5e9 < n38 < 8.5e9, n38
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
        )
    assert n24 == sum(p.numel() for p in ref.parameters())
    assert MMDIT_PRESETS["MMDiT-d24/2"]["hidden_size"] == 64 * 24


def test_same_output_as_diffusers_sd3():
    diffusers = pytest.importorskip("diffusers")
    from ditkit.models.mmdit import diffusers_config, from_diffusers_state_dict, to_diffusers_state_dict

    ours = MMDiT(**{**TINY, "pooled_channels": 16}).eval()
    _randomise(ours)
    config = diffusers_config(ours)
    ref = diffusers.SD3Transformer2DModel(**{k: v for k, v in config.items() if k != "_class_name"}).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    x, t, cond = _inputs()
    pooled = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    full = PromptCondition(cond[0], None, pooled)  # diffusers' SD3 has no text padding mask
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=cond[0], pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, full)
    assert (got - expected).abs().max() < 1e-4
    back = MMDiT(**{**TINY, "pooled_channels": 16}).eval()
    back.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x, t, full), got)
    with pytest.raises(ConfigError, match="can be exported"):
        to_diffusers_state_dict(MMDiT(**TINY, mlp="swiglu"))

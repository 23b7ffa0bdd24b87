"""The image DiT: shapes, adaLN-Zero init, the paper's parameter/MAC table, key names, options."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditkit.models.dit import DIT_PRESETS, DiT, build_dit, count_params, forward_macs, sincos_2d
from ditkit.models.layers import apply_rope, rope_1d, timestep_embedding

PAPER_GFLOPS = {"DiT-S/8": 0.36, "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64}


def tiny(**kw) -> DiT:
    args = dict(input_size=8, in_channels=3, num_classes=5, learn_sigma=True)
    args.update(kw)
    return build_dit("DiT-T/2", **args)


def randomise_zero_layers(model: DiT, seed: int = 0) -> None:
    """Give the zero-initialised adaLN/final layers random weights so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_preset_shapes(name):
    # Large presets run on the meta device: shapes without memory or compute.
    small = name.startswith(("DiT-T/", "DiT-XS/"))
    device = torch.device("cpu") if small else torch.device("meta")
    size = 16 if small else 32
    with device:
        model = build_dit(name, input_size=size, in_channels=4, num_classes=10)
        x, t, y = torch.randn(2, 4, size, size), torch.tensor([0.0, 999.0]), torch.tensor([1, 10])
        out = model(x, t, y)
    assert out.shape == (2, 8, size, size)


def test_new_model_outputs_zeros_and_block_is_identity():
    model = tiny()
    x = torch.randn(3, 3, 8, 8)
    out = model(x, torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 6, 8, 8)
    assert torch.count_nonzero(out) == 0
    h, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(model.blocks[0](h, c), h)


def test_xl2_parameter_count_matches_paper():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert count_params(model) == 675_129_632


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_forward_macs_match_paper_table(name):
    with torch.device("meta"):
        model = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
    assert forward_macs(model) / 1e9 == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


def test_forward_macs_match_torch_flop_counter():
    model = tiny(num_classes=0).eval()
    x = torch.randn(1, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([3.0]))
    # The counter sees Linear/Conv (2 FLOPs per MAC) but not the CPU flash-attention kernel,
    # so add the two attention matmuls (2 N^2 D MACs per block) by hand.
    N, D = model.grid_size**2, model.pos_embed.shape[-1]
    attention_macs = len(model.blocks) * 2 * N * N * D
    assert counter.get_total_flops() + 2 * attention_macs == 2 * forward_macs(model)


def test_official_key_names():
    keys = set(tiny().state_dict())
    for key in [
        "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
        "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
        "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias",
    ]:
        assert key in keys, key
    assert tiny().y_embedder.embedding_table.weight.shape[0] == 6  # num_classes + null row


def test_pos_embed_layout_first_half_columns():
    D, G = 16, 4
    table = sincos_2d(D, G).numpy()  # (G*G, D)
    row, col = 1, 3
    token = row * G + col
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    expect = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[token], expect, atol=1e-12)


def test_timestep_embedding_official_and_diffusers_frequencies():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    shifted = timestep_embedding(t, 8, freq_shift=1.0)
    freqs1 = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    assert torch.allclose(shifted[1], torch.cat([torch.cos(10 * freqs1), torch.sin(10 * freqs1)]))


def test_label_dropout_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    randomise_zero_layers(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 5.0])
    model.train()
    torch.manual_seed(0)
    dropped = model(x, t, torch.tensor([1, 2]))
    null = model(x, t, torch.tensor([5, 5]))
    assert torch.allclose(dropped, null)  # every label replaced by the null class
    model.eval()
    assert not torch.allclose(model(x, t, torch.tensor([1, 2])), null)


def test_unconditional_model_and_label_errors():
    model = tiny(num_classes=0)
    assert model.y_embedder is None
    model(torch.randn(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional"):
        tiny()(torch.randn(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        build_dit("DiT-T/4", input_size=10)
    with pytest.raises(ValueError, match="expects input"):
        tiny()(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize(
    "options",
    [dict(qk_norm=True), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(pos_embed="rope"),
     dict(qk_norm=True, norm="rmsnorm", mlp="swiglu", pos_embed="rope")],
)
def test_options_train_and_differ_from_default(options):
    torch.manual_seed(0)
    base = tiny()
    torch.manual_seed(0)
    model = tiny(**options)
    randomise_zero_layers(base)
    randomise_zero_layers(model)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 1])
    out = model(x, t, y)
    assert out.shape == (2, 6, 8, 8)
    out.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if "mlp" not in options:  # same parameter shapes: outputs must differ
        assert not torch.allclose(out, base.eval()(x, t, y))


def test_swiglu_keeps_parameter_count_close():
    gelu, swiglu = count_params(tiny()), count_params(tiny(mlp="swiglu"))
    assert abs(swiglu - gelu) / gelu < 0.02


def test_rope_is_relative():
    cos, sin = rope_1d(16, 8)
    q, k = torch.randn(8), torch.randn(8)
    def rot(v, pos):
        return apply_rope(v.view(1, 1, 1, 8), cos[pos : pos + 1], sin[pos : pos + 1]).view(8)
    # <R_m q, R_n k> depends only on m - n, and rotation keeps norms.
    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 9) @ rot(k, 6), atol=1e-5)
    assert torch.allclose(rot(q, 7).norm(), q.norm(), atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = tiny()
    randomise_zero_layers(a)
    b = tiny(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    a.eval(), b.eval()
    a(x, t, y).square().sum().backward()
    b(x, t, y).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


@pytest.mark.parametrize("is_causal", [False, True])
def test_cpu_bf16_attention_path_matches_sdpa(is_causal):
    from ditkit.models.layers import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    fast = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=is_causal)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - ref).abs().max() < 0.05  # bf16 rounding of inputs and outputs
    assert torch.equal(attention(q, k, v, is_causal=is_causal), ref)  # fp32 takes SDPA itself

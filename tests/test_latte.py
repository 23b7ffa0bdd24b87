"""Latte video DiT: shapes, sizes not baked in, the space/time structure, conditioning, presets."""

from __future__ import annotations

import pytest
import torch

from ditkit.models.dit import DiT, count_params
from ditkit.models.latte import (
    LATTE_PRESETS,
    Latte,
    SpaceTimeBlock,
    build_latte,
    latte_forward_macs,
    sincos_grid,
)
from ditkit.models.dit import sincos_2d
from ditkit.registry import MODEL_FAMILIES

TINY = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=4, num_heads=4, num_frames=4)


def tiny(**kw) -> Latte:
    torch.manual_seed(0)
    model = Latte(**{**TINY, "num_classes": 3, **kw})
    randomise(model)
    return model.eval()


def randomise(model: torch.nn.Module, std: float = 0.1) -> None:
    """adaLN-Zero makes a new model output zeros; give every parameter a value so outputs depend on inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def clip(B: int = 2, F: int = 4, H: int = 16, W: int = 16, C: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, F, H, W, generator=torch.Generator().manual_seed(seed))


T2 = torch.tensor([5.0, 700.0])
Y2 = torch.tensor([0, 2])


@pytest.mark.parametrize("attention", ["interleaved", "full"])
@pytest.mark.parametrize("tubelet", [1, 2])
def test_output_shape_and_learn_sigma(attention: str, tubelet: int) -> None:
    model = tiny(attention=attention, tubelet_size=tubelet)
    out = model(clip(), T2, Y2)
    assert out.shape == (2, 2, 4, 16, 16)  # learn_sigma doubles channels
    assert torch.isfinite(out).all()
    plain = tiny(attention=attention, tubelet_size=tubelet, learn_sigma=False)
    assert plain(clip(), T2, Y2).shape == (2, 1, 4, 16, 16)


def test_new_model_outputs_zero() -> None:
    # adaLN-Zero: the final linear is zero-initialised, as DiT/Latte.
    model = Latte(**TINY, num_classes=3)
    assert torch.count_nonzero(model(clip(), T2, Y2)) == 0


def test_trained_on_8_frames_runs_on_16_and_other_sizes() -> None:
    model8 = tiny(num_frames=8)
    model16 = Latte(**{**TINY, "num_classes": 3, "num_frames": 16, "input_size": 32})
    # No tensor depends on the frame count or resolution: the weights load across sizes strictly.
    model16.load_state_dict(model8.state_dict(), strict=True)
    out = model16.eval()(clip(F=16, H=24, W=32), T2, Y2)
    assert out.shape == (2, 2, 16, 24, 32) and torch.isfinite(out).all()
    # The same weights on the first 8 frames give a different (but valid) answer than on 16:
    # temporal attention sees the extra frames.
    x16 = clip(F=16)
    a = model8(x16[:, :, :8], T2, Y2)
    b = model8(x16, T2, Y2)[:, :, :8]
    assert not torch.allclose(a, b, atol=1e-5)


def test_bad_shapes_raise() -> None:
    model = tiny(tubelet_size=2)
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        model(clip(H=18), T2, Y2)
    with pytest.raises(ValueError, match="tubelet size 2"):
        model(clip(F=5), T2, Y2)
    with pytest.raises(ValueError, match=r"\(B, 1, F, H, W\)"):
        model(torch.randn(2, 1, 16, 16), T2, Y2)
    with pytest.raises(ValueError, match="depth 3 must be even"):
        Latte(**{**TINY, "depth": 3})


def test_spatial_block_keeps_frames_apart_temporal_block_mixes_them() -> None:
    torch.manual_seed(0)
    block = SpaceTimeBlock(32, 4)
    randomise(block)
    c = torch.randn(1, 32)
    x = torch.randn(1, 3 * 5, 32)  # 3 groups of 5 tokens
    y = x.clone()
    y[:, 12] += torch.randn(32)  # a token of group 2 (not a constant: LayerNorm would remove it)
    diff = (block(x, c, groups=3) - block(y, c, groups=3)).abs().sum(-1)[0]
    assert diff[:10].max() == 0 and diff[10:].min() > 1e-3  # groups 0, 1 untouched; all of group 2 moves
    full = (block(x, c, groups=1) - block(y, c, groups=1)).abs().sum(-1)[0]
    assert full.min() > 1e-3  # one group: every token sees the change


@pytest.mark.parametrize("attention", ["interleaved", "full"])
def test_information_flows_across_frames_and_patches(attention: str) -> None:
    model = tiny(attention=attention)
    x = clip(B=1)
    x2 = x.clone()
    x2[:, :, 3, :4, :4] += 1.0  # last frame, top-left patch
    diff = (model(x, T2[:1], Y2[:1]) - model(x2, T2[:1], Y2[:1])).abs()
    # frame 0, bottom-right patch changes: it reached it through space and time
    assert diff[:, :, 0, 12:, 12:].sum() > 0


def test_temporal_position_embedding_breaks_frame_permutation_symmetry() -> None:
    # Without the temporal table, temporal attention is permutation-equivariant in the frames,
    # so reversing the input would just reverse the output. With it, it must not.
    model = tiny()
    x = clip()
    out = model(x, T2, Y2)
    out_rev = model(x.flip(2), T2, Y2).flip(2)
    assert (out - out_rev).abs().max() > 1e-3
    # Sanity of the argument: the same model with the temporal table zeroed is equivariant.
    model.position_tables(4, 4, 4, x.device, x.dtype)[1].zero_()
    out, out_rev = model(x, T2, Y2), model(x.flip(2), T2, Y2).flip(2)
    assert torch.allclose(out, out_rev, atol=1e-5)


def test_single_frame_full_attention_is_the_image_dit() -> None:
    # Same key names as the image DiT (but no stored pos_embed): a full-attention Latte on one
    # frame is exactly that DiT.
    dit = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=3)
    randomise(dit)
    dit.reset_pos_embed()
    latte = Latte(**{**TINY, "depth": 2, "num_classes": 3, "attention": "full"})
    state = {k: v for k, v in dit.state_dict().items() if k != "pos_embed"}
    latte.load_state_dict(state, strict=True)
    dit.eval(), latte.eval()
    x = torch.randn(2, 1, 16, 16)
    latte.position_tables(1, 4, 4, x.device, x.dtype)[1].zero_()  # frame 0's temporal code off
    torch.testing.assert_close(latte(x[:, :, None], T2, Y2)[:, :, 0], dit(x, T2, Y2), atol=1e-5, rtol=1e-5)


def test_interleaved_spatial_blocks_are_the_image_dit_per_frame() -> None:
    # With its temporal blocks zeroed (identity: adaLN-Zero gates), interleaved Latte runs each
    # frame through the image DiT made of its spatial blocks: the image initialisation of Latte.
    latte = tiny(depth=4)
    for block in latte.blocks[1::2]:
        torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
        torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
    dit = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=3).eval()
    state = {"pos_embed": dit.pos_embed.detach().clone()}
    for k, v in latte.state_dict().items():
        if not k.startswith("blocks."):
            state[k] = v
        elif int(k.split(".")[1]) % 2 == 0:  # spatial block 2j -> DiT block j
            state[f"blocks.{int(k.split('.')[1]) // 2}." + k.split(".", 2)[2]] = v
    dit.load_state_dict(state, strict=True)
    x = clip(F=3)
    latte.position_tables(3, 4, 4, x.device, x.dtype)[1].zero_()  # frame-index table off: per-frame DiT
    out = latte(x, T2, Y2)
    for f in range(3):
        torch.testing.assert_close(out[:, :, f], dit(x[:, :, f], T2, Y2), atol=1e-5, rtol=1e-5)


def test_sincos_grid_matches_image_dit_table_when_square() -> None:
    torch.testing.assert_close(sincos_grid(32, 4, 4), sincos_2d(32, 4))
    assert sincos_grid(32, 2, 3).shape == (6, 32)


def test_class_conditioning_null_class_and_dropout() -> None:
    model = tiny()
    x = clip()
    t = torch.tensor([300.0, 300.0])
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4
    null = model(x, t, torch.tensor([3, 3]))  # num_classes = 3 is the null class
    model.y_embedder.dropout_prob = 1.0
    model.train()  # every label dropped to the null class
    torch.testing.assert_close(model(x, t, torch.tensor([0, 1])), null)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t, None)
    uncond = tiny(num_classes=0)
    assert uncond(x, t, None).shape == (2, 2, 4, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))


def test_timestep_changes_output() -> None:
    model = tiny()
    x = clip()
    assert (model(x, torch.tensor([1.0, 1.0]), Y2) - model(x, torch.tensor([900.0, 900.0]), Y2)).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ["interleaved", "full"])
def test_gradient_checkpointing_same_output_and_gradients(attention: str) -> None:
    ref = tiny(attention=attention)
    ckpt = tiny(attention=attention, grad_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    x = clip()
    grads = []
    for model in (ref, ckpt):
        model.zero_grad()
        out = model(x, T2, Y2)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_latte_xl2_parameter_count_matches_paper() -> None:
    # Latte paper Table 1: Latte-XL 673.68M (unconditional, 4 latent channels, learned sigma).
    with torch.device("meta"):
        xl = build_latte("Latte-XL/2", num_classes=0, in_channels=4)
        ucf = build_latte("Latte-XL/2", num_classes=101, in_channels=4)
    assert count_params(xl) == 673_681_568
    assert count_params(ucf) - count_params(xl) == 102 * 1152  # class table with the null row
    assert len(xl.blocks) == 28 and xl.hidden_size == 1152 and xl.num_heads == 16


def test_presets_and_registry() -> None:
    assert {"Latte-XL/2", "Latte-L/2", "Latte-B/2", "Latte-S/2", "Latte-T/4", "Latte-XS/2"} <= set(LATTE_PRESETS)
    tiny_model = build_latte("Latte-T/4", input_size=32, in_channels=1, num_frames=8, num_classes=10)
    assert count_params(tiny_model) < 400_000
    with pytest.raises(ValueError, match="unknown model"):
        build_latte("Latte-Q/2")
    entry = MODEL_FAMILIES.get("latte")
    assert entry.obj is Latte and entry.modality == "video" and entry.presets is LATTE_PRESETS


def test_forward_macs_scale_with_frames() -> None:
    inter = build_latte("Latte-T/4", input_size=32, num_frames=8)
    full = build_latte("Latte-T/4", input_size=32, num_frames=8, attention="full")
    # Linear layers scale linearly with frames; full attention adds a term quadratic in frames.
    r_inter = latte_forward_macs(inter, 16) / latte_forward_macs(inter, 8)
    r_full = latte_forward_macs(full, 16) / latte_forward_macs(full, 8)
    assert 1.9 < r_inter < 2.1 and r_full > r_inter


def test_a_few_steps_fit_a_batch() -> None:
    # Gradients reach every part through the zero-initialised adaLN gates: the loss falls fast.
    torch.manual_seed(0)
    model = build_latte("Latte-T/4", input_size=16, in_channels=1, num_frames=4, num_classes=3, learn_sigma=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, target = clip(seed=1), clip(seed=2)
    losses = []
    for _ in range(40):
        loss = (model(x, T2, Y2) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_training_after_sampling_under_inference_mode() -> None:
    # The position tables are cached; one made under inference_mode must still serve training.
    model = tiny()
    with torch.inference_mode():
        model(clip(), T2, Y2)
    tables = model.position_tables(4, 4, 4, torch.device("cpu"), torch.float32)
    assert not any(t.is_inference() for t in tables)  # else any op that saves them for backward fails
    model.train()
    model(clip(), T2, Y2).square().mean().backward()
    assert model.x_embedder.proj.weight.grad is not None


# ---- RoPE (pos_embed="rope") -------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["interleaved", "full"])
def test_rope_keeps_the_weights_and_runs_at_any_size(attention: str) -> None:
    rope = tiny(attention=attention, pos_embed="rope")
    assert rope.state_dict().keys() == tiny(attention=attention).state_dict().keys()  # nothing learned is added
    out = rope(clip(F=6, H=24, W=32), T2, Y2)
    assert out.shape == (2, 2, 6, 24, 32) and torch.isfinite(out).all()
    # checkpointing passes the tables through: same output
    ckpt = tiny(attention=attention, pos_embed="rope", grad_checkpointing=True).train()
    ckpt.y_embedder.dropout_prob = 0.0
    with torch.enable_grad():
        assert torch.allclose(ckpt(clip(), T2, Y2), rope(clip(), T2, Y2), atol=1e-6)


@pytest.mark.parametrize("attention", ["interleaved", "full"])
def test_rope_carries_no_absolute_position_and_keeps_frame_order(attention: str) -> None:
    """With rotated queries and keys nothing marks where a token is: a clip of one constant value
    comes out the same at every place and frame (sin-cos tables make the places differ). Relative
    offsets still order the frames: reversing a clip does not reverse the output."""
    rope, sincos = tiny(attention=attention, pos_embed="rope"), tiny(attention=attention)
    flat = torch.full((1, 1, 4, 16, 16), 0.3)
    out = rope(flat, T2[:1], Y2[:1])
    patches = out.unfold(3, 4, 4).unfold(4, 4, 4)  # (1, C, F, 4, 4, p, p): every patch of every frame
    first = patches[:, :, :1, :1, :1]
    assert torch.allclose(patches, first.expand_as(patches), atol=1e-5)
    sincos_patches = sincos(flat, T2[:1], Y2[:1]).unfold(3, 4, 4).unfold(4, 4, 4)
    assert (sincos_patches - sincos_patches[:, :, :1, :1, :1]).abs().max() > 1e-3
    x = clip()
    assert (rope(x, T2, Y2) - rope(x.flip(2), T2, Y2).flip(2)).abs().max() > 1e-3


def test_rope_tables_give_each_axis_its_channel_pairs() -> None:
    from ditkit.models.layers import rope_2d, rope_axes

    model = tiny(pos_embed="rope")  # head width 8: 4 pairs, 2 for rows and 2 for columns
    (spatial_cos, spatial_sin), (temporal_cos, _) = model.rope_tables(5, 4, 4, torch.device("cpu"))
    assert torch.equal(spatial_cos, rope_2d(4, 8)[0]) and torch.equal(spatial_sin, rope_2d(4, 8)[1])
    assert temporal_cos.shape == (5, 4) and torch.equal(temporal_cos, rope_axes([torch.arange(5)], [4])[0])
    full = Latte(**{**TINY, "hidden_size": 48, "num_heads": 4, "num_classes": 3, "attention": "full", "pos_embed": "rope"})
    (cos, _), _ = full.rope_tables(2, 2, 3, torch.device("cpu"))  # head width 12: 6 pairs = 2 frame + 2 row + 2 column
    f, r, c = torch.arange(2).repeat_interleave(6), torch.arange(2).repeat_interleave(3).repeat(2), torch.arange(3).repeat(4)
    assert torch.equal(cos, rope_axes([f, r, c], [2, 2, 2])[0])
    with pytest.raises(ValueError, match="pos_embed='alibi'"):
        Latte(**TINY, pos_embed="alibi")
    with pytest.raises(ValueError, match="must be even and >= 6"):
        Latte(**{**TINY, "hidden_size": 16, "attention": "full", "pos_embed": "rope"})

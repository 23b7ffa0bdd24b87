"""The audio DiT: adaLN-Zero truly zero at init, 1-D patch layout, class and duration conditioning,
lengths not baked in, presets and registry."""

import pytest
import torch
from torch import nn

from ditkit.errors import ConfigError
from ditkit.models.audio_dit import AUDIO_DIT_PRESETS, AudioDiT, build_audio_dit, count_params
from ditkit.models.layers import DiTBlock, FinalLayer
from ditkit.registry import MODEL_FAMILIES


def tiny(**kw) -> AudioDiT:
    args = dict(n_mels=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=3, frames_per_second=16.0)
    return AudioDiT(**{**args, **kw})


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (a trained model is not zero-initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_adaln_zero_at_init_output_is_exactly_zero_and_blocks_are_identity(learn_sigma):
    torch.manual_seed(0)
    model = tiny(learn_sigma=learn_sigma)
    for m in model.modules():  # every modulation Linear and the final Linear are zero (F5-TTS missed this)
        if isinstance(m, (DiTBlock, FinalLayer)):
            assert torch.count_nonzero(m.adaLN_modulation[-1].weight) == 0
            assert torch.count_nonzero(m.adaLN_modulation[-1].bias) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    seen = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen.append(torch.equal(inp[0], out))) for b in model.blocks]
    x = torch.randn(2, 8, 12)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([0, 2]), torch.tensor([0.3, 0.5]))
    for h in hooks:
        h.remove()
    assert seen == [True, True]
    assert out.shape == (2, 16 if learn_sigma else 8, 12)
    assert torch.count_nonzero(out) == 0


def test_zero_init_still_learns():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 8, 8)
    loss = (model(x, torch.tensor([5.0, 50.0]), torch.tensor([0, 1])) - x).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_patch_layout_maps_frames_to_the_same_frames():
    # With no blocks every token is processed on its own, so changing frames 4..5 (token 2) may only
    # change output frames 4..5; a wrong patchify/unpatchify order would move the change elsewhere.
    model = perturb(tiny(depth=0))
    x = torch.randn(1, 8, 10)
    x2 = x.clone()
    x2[:, :, 4:6] += 1.0
    t, y = torch.tensor([100.0]), torch.tensor([1])
    diff = (model(x2, t, y) - model(x, t, y)).abs().sum(dim=1)[0]  # (T,)
    assert diff[4] > 0 and diff[5] > 0
    assert torch.all(diff[[0, 1, 2, 3, 6, 7, 8, 9]] == 0)


def test_length_is_not_baked_in():
    model = perturb(tiny())
    assert not any("pos" in k for k in model.state_dict())  # nothing sized by the sequence is stored
    for T in (2, 16, 46):
        out = model(torch.randn(1, 8, T), torch.tensor([3.0]), torch.tensor([0]))
        assert out.shape == (1, 8, T) and torch.isfinite(out).all()
    short, long = model.pos_embed(5, torch.device("cpu"), torch.float32), model.pos_embed(9, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(short, long[:, :5])
    assert not torch.equal(long[0, 0], long[0, 1])  # positions are distinguishable


def test_class_and_duration_change_the_output():
    model = perturb(tiny()).eval()
    x, t = torch.randn(1, 8, 8), torch.tensor([500.0])
    base = model(x, t, torch.tensor([0]), torch.tensor([0.5]))
    assert not torch.allclose(base, model(x, t, torch.tensor([1]), torch.tensor([0.5])))
    assert not torch.allclose(base, model(x, t, torch.tensor([0]), torch.tensor([0.2])))
    assert not torch.allclose(base, model(x, t, torch.tensor([0]), torch.tensor([[1.0, 0.5]])))  # seconds_start


def test_duration_forms_agree():
    model = perturb(tiny()).eval()  # frames_per_second 16: 8 frames = 0.5 s
    x, t, y = torch.randn(2, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    as_total = model(x, t, y, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(as_total, model(x, t, y, torch.tensor([[0.0, 0.5], [0.0, 0.5]])))
    torch.testing.assert_close(as_total, model(x, t, y, None))
    # clamped at max_seconds: asking for more than the maximum is the maximum
    far = model(x, t, y, torch.tensor([1e3, 1e3]))
    torch.testing.assert_close(far, model(x, t, y, torch.tensor([model.max_seconds] * 2)))
    with pytest.raises(ConfigError, match="duration must be"):
        model(x, t, y, torch.zeros(2, 3))


def test_without_duration_conditioning_duration_is_ignored():
    model = perturb(tiny(duration_conditioning=False)).eval()
    x, t, y = torch.randn(1, 8, 4), torch.tensor([1.0]), torch.tensor([2])
    assert model.start_embedder is None
    torch.testing.assert_close(model(x, t, y, torch.tensor([0.1])), model(x, t, y, torch.tensor([0.9])))


def test_label_dropout_in_training_uses_the_null_class():
    model = perturb(tiny(class_dropout_prob=1.0))
    x, t = torch.randn(2, 8, 4), torch.tensor([3.0, 3.0])
    model.train()
    dropped = model(x, t, torch.tensor([0, 1]))
    model.eval()
    torch.testing.assert_close(dropped, model(x, t, torch.tensor([3, 3])))  # 3 = num_classes = null class
    assert not torch.allclose(dropped, model(x, t, torch.tensor([0, 1])))


def test_unconditional_model():
    model = perturb(tiny(num_classes=0))
    assert model.y_embedder is None
    assert model(torch.randn(1, 8, 4), torch.tensor([1.0])).shape == (1, 8, 4)
    with pytest.raises(ConfigError, match="unconditional"):
        model(torch.randn(1, 8, 4), torch.tensor([1.0]), torch.tensor([0]))


def test_bad_inputs_raise_config_error():
    model = tiny()
    t, y = torch.tensor([1.0]), torch.tensor([0])
    with pytest.raises(ConfigError, match="multiple of patch size 2"):
        model(torch.randn(1, 8, 5), t, y)
    with pytest.raises(ConfigError, match=r"\(B, 8, T\)"):
        model(torch.randn(1, 9, 4), t, y)
    with pytest.raises(ConfigError, match="class-conditional"):
        model(torch.randn(1, 8, 4), t, None)
    with pytest.raises(ConfigError, match="choose one of"):
        build_audio_dit("AudioDiT-Z/2")


def test_preset_parameter_counts():
    # n_mels 64, patch 2, 10 classes, duration conditioning: the counts the preset table documents
    expected = {"AudioDiT-T/2": 386_176, "AudioDiT-XS/2": 4_383_488, "AudioDiT-S/2": 33_057_920, "AudioDiT-B/2": 131_291_264}
    assert set(expected) == set(AUDIO_DIT_PRESETS)
    for name, count in expected.items():
        with torch.device("meta"):
            model = build_audio_dit(name)
        assert count_params(model) == count, name


def test_registered_as_audio_model_family():
    entry = MODEL_FAMILIES.get("audio_dit")
    assert entry.obj is AudioDiT
    assert entry.modality == "audio"
    assert entry.presets is AUDIO_DIT_PRESETS


def test_tiny_preset_runs_one_second_of_mels():
    model = build_audio_dit("AudioDiT-T/2")
    out = model(torch.randn(2, 64, 64), torch.tensor([0.0, 999.0]), torch.tensor([3, 10]))
    assert out.shape == (2, 64, 64)

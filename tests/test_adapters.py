"""LoRA / DoRA adapters through peft (ditkit.adapters): inject, train, save, load, stack, merge,
diffusers layout, bad input, bitwise resume. Tiny models, CPU, seconds."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from ditkit import adapters as ad  # noqa: E402
from ditkit.diffusion.flow import FlowMatching  # noqa: E402
from ditkit.errors import ConfigError  # noqa: E402
from ditkit.models.dit import build_dit  # noqa: E402
from ditkit.models.text_dit import build_text_dit  # noqa: E402


def tiny_dit(seed: int = 0, **kw) -> torch.nn.Module:
    """DiT-T/4 on 16x16x1, 10 classes, every weight random (adaLN-Zero would hide adaLN adapters)."""
    args = dict(input_size=16, in_channels=1, num_classes=10, timestep_freq_shift=1.0) | kw
    model = build_dit("DiT-T/4", **args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 16, 16, generator=g), torch.tensor([0.0, 400.0, 999.0]), torch.tensor([0, 7, 10])


def randomize_adapters(model, seed: int, name=None) -> None:
    """peft starts B at 0 (no change); random factors make every adapter visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def run(model, x=None, t=None, y=None):
    if x is None:
        x, t, y = inputs()
    with torch.no_grad():
        return model(x, t, y)


def fresh_base(source) -> torch.nn.Module:
    """A plain DiT holding `source`'s base weights (as a pipeline would load them from disk)."""
    model = tiny_dit(seed=99)
    model.load_state_dict(ad.base_state_dict(source))
    return model


# ---- injecting -----------------------------------------------------------------------------------


def test_apply_lora_keeps_the_model_and_its_outputs_and_trains_only_adapters():
    model = tiny_dit()
    before = run(model)
    keys_before = set(model.state_dict())
    out = ad.apply_lora(model, rank=4, targets="attn,mlp")
    assert out is model and type(model).__name__ == "DiT"
    assert torch.equal(run(model), before)  # B = 0 at the start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r (in + out) per adapted Linear: qkv 64->192, proj 64->64, fc1 64->256, fc2 256->64, 4 blocks
    assert sum(p.numel() for p in ad.adapter_parameters(model)) == 4 * 4 * ((64 + 192) + 128 + 2 * (64 + 256))
    assert set(ad.base_state_dict(model)) == keys_before
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert all(p.grad is not None for p in ad.adapter_parameters(model))


def test_target_presets_resolve_to_layers_of_each_family():
    model = tiny_dit()
    assert ad.resolve_targets(model, "attn") == [f"blocks.{i}.attn.{k}" for i in range(4) for k in ("qkv", "proj")]
    adaln = ad.resolve_targets(model, ["adaln"])  # any case
    assert adaln[-1] == "final_layer.adaLN_modulation.1" and len(adaln) == 5
    assert ad.resolve_targets(model, r"blocks\.[01]\.mlp\.fc1") == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert set(ad.lora_target_presets(model)) == {"attn", "qkv", "mlp", "adaLN", "final"}  # no cross_attn
    text = build_text_dit("TextDiT-T", vocab_size=20)
    assert ad.resolve_targets(text, "qkv") == [f"blocks.{i}.attn.qkv" for i in range(4)]


def test_presets_cover_the_prompt_families():
    cross = pytest.importorskip("ditkit.models.cross_dit").build_cross_dit("CrossDiT-T/2")
    depth = len(cross.blocks)
    assert ad.resolve_targets(cross, "cross_attn") == [
        f"blocks.{i}.cross_attn.{k}" for i in range(depth) for k in ("q_linear", "kv_linear", "proj")
    ]
    assert ad.resolve_targets(cross, "adaLN") == ["t_block.1"]  # PixArt's shared adaLN-single
    mmdit = pytest.importorskip("ditkit.models.mmdit").build_mmdit("MMDiT-T/2")
    attn = ad.resolve_targets(mmdit, "attn")
    assert {"blocks.0.attn.qkv", "blocks.0.attn.context_qkv", "blocks.0.attn.context_proj"} <= set(attn)
    assert "blocks.0.context_mlp.fc2" in ad.resolve_targets(mmdit, "mlp")


def test_bad_targets_rank_and_options_are_one_line_config_errors():
    model = tiny_dit()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"preset 'cross_attn' matches no Linear layer of this DiT.*attn, qkv, mlp"):
        ad.apply_lora(model, 4, targets="attn,cross_attn")
    with pytest.raises(ConfigError, match=re.escape("pattern 'blocks\\.9\\.attn' matches no Linear layer")):
        ad.apply_lora(model, 4, targets=r"blocks\.9\.attn")
    # final_layer.linear is 64 -> 4*4*2 = 32 outputs: rank 64 does not fit it, but fits attn/mlp
    with pytest.raises(ConfigError, match=r"--lora-rank 64 is larger than layer final_layer\.linear \(64 -> 32, width 32\)"):
        ad.apply_lora(model, 64, targets="attn,final")
    for bad, pattern in [
        (dict(rank=0), "positive integer"), (dict(rank=4, variant="loha"), "choose one of lora, dora"),
        (dict(rank=4, alpha="x"), "not a number"), (dict(rank=4, name="a.b"), "letters, digits"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            ad.apply_lora(model, **bad)
    assert not ad.adapters_of(model) and [p.requires_grad for p in model.parameters()] == flags  # untouched
    ad.apply_lora(model, 64, targets="attn,mlp")  # fine where the layers are wide enough
    with pytest.raises(ConfigError, match="already in this model"):
        ad.apply_lora(model, 4)


# ---- saving, loading, stacking, merging --------------------------------------------------------


def test_save_then_load_gives_the_same_outputs_from_a_small_file(tmp_path):
    model = ad.apply_lora(tiny_dit(), 4, alpha=8, targets="attn,mlp,adaLN", base_model="DiT-T/4 test base")
    randomize_adapters(model, 0)
    adapted = run(model)
    ad.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ad.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 8.0, False)
    own = config["ditkit"]
    assert own["targets"] == ["attn", "mlp", "adaLN"] and own["variant"] == "lora"
    assert own["base_model"] == "DiT-T/4 test base" and own["base_sha256"] == ad.base_sha256(model)
    assert len(own["target_modules"]) == 4 * 5 + 1
    size = (tmp_path / "a" / ad.ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.3 * sum(v.numel() * 4 for v in ad.base_state_dict(model).values())

    base = fresh_base(model)
    assert not torch.allclose(run(base), adapted, atol=1e-3)
    name = ad.load_adapter(base, tmp_path / "a")
    assert name == "a" and type(base).__name__ == "DiT"
    assert torch.equal(run(base), adapted)
    assert not any(p.requires_grad for p in base.parameters())  # inference: all frozen
    # the safetensors file alone carries the config
    other = fresh_base(model)
    ad.load_adapter(other, tmp_path / "a" / ad.ADAPTER_WEIGHTS, name="solo")
    assert torch.equal(run(other), adapted)


def test_stacked_adapters_weigh_by_scale_merge_exactly_and_unload(tmp_path):
    base_model = tiny_dit()
    base_out = run(base_model)
    for i, targets in enumerate(["attn,mlp", "mlp,adaLN"]):
        m = ad.apply_lora(fresh_base(base_model), 4, targets=targets)
        randomize_adapters(m, 10 + i)
        ad.save_adapter(m, tmp_path / f"ad{i}")
    model = fresh_base(base_model)
    ad.load_adapter(model, tmp_path / "ad0", scale=1.0, name="a")
    only_a = run(model)
    ad.load_adapter(model, tmp_path / "ad1", scale=0.5, name="b")
    both = run(model)
    assert {n: i.scale for n, i in ad.adapters_of(model).items()} == {"a": 1.0, "b": 0.5}
    assert (both - only_a).abs().max() > 1e-3  # b is active too
    ad.set_adapter_scales(model, {"a": 0.0, "b": 0.0})
    assert torch.allclose(run(model), base_out, atol=1e-6)
    ad.set_adapter_scales(model, {"a": 1.0, "b": 0.0})
    assert torch.allclose(run(model), only_a, atol=1e-6)
    ad.set_adapter_scales(model, {"a": 1.0, "b": 0.5})
    with pytest.raises(ConfigError, match="not a number"):
        ad.set_adapter_scales(model, {"a": "strong"})
    with pytest.raises(ConfigError, match="already loaded"):
        ad.load_adapter(model, tmp_path / "ad0", name="a")

    merged = ad.merge_adapters(model)
    assert merged is model and not ad.adapters_of(model)
    assert set(model.state_dict()) == set(base_model.state_dict())  # plain keys again
    assert (run(model) - both).abs().max() < 1e-5

    model = fresh_base(base_model)
    ad.load_adapter(model, tmp_path / "ad0", name="a")
    ad.load_adapter(model, tmp_path / "ad1", name="b", scale=-1)
    ad.unload_adapters(model, ["b"])
    assert list(ad.adapters_of(model)) == ["a"] and torch.allclose(run(model), only_a, atol=1e-6)
    ad.unload_adapters(model)
    assert torch.equal(run(model), base_out) and set(model.state_dict()) == set(base_model.state_dict())


def test_dora_saves_loads_and_merges(tmp_path):
    model = ad.apply_lora(tiny_dit(), 4, targets="attn,adaLN", variant="dora")
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    randomize_adapters(model, 3)
    adapted = run(model)
    ad.save_adapter(model, tmp_path / "d")
    base = fresh_base(model)
    ad.load_adapter(base, tmp_path / "d")
    assert torch.equal(run(base), adapted)
    ad.merge_adapters(base)
    assert (run(base) - adapted).abs().max() < 1e-5
    two = fresh_base(model)
    ad.load_adapter(two, tmp_path / "d", name="x")
    ad.load_adapter(two, tmp_path / "d", name="y")
    with pytest.raises(ConfigError, match="cannot merge 2 adapters when one is DoRA"):
        ad.merge_adapters(two)


def test_text_dit_adapter_round_trip(tmp_path):
    text = build_text_dit("TextDiT-T", vocab_size=20, time_conditioning=True).eval()
    ad.apply_lora(text, 8, targets="attn,mlp,adaLN")
    randomize_adapters(text, 5)
    tokens, t = torch.randint(0, 21, (2, 12), generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        adapted = text(tokens, t)
    ad.save_adapter(text, tmp_path / "t")
    plain = build_text_dit("TextDiT-T", vocab_size=20, time_conditioning=True).eval()
    plain.load_state_dict(ad.base_state_dict(text))
    ad.load_adapter(plain, tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(plain(tokens, t), adapted)


def test_adapter_from_another_base_is_refused_naming_both(tmp_path):
    model = ad.apply_lora(tiny_dit(), 4, base_model="DiT-T/4 run A")
    randomize_adapters(model, 0)
    ad.save_adapter(model, tmp_path / "a")
    wider = build_dit("DiT-T/4", input_size=16, in_channels=1, num_classes=10, hidden_size=128)
    with pytest.raises(ConfigError, match=r"trained on DiT-T/4 run A \(layer blocks\.0\.attn\.qkv: 64 -> 192\) but this model is DiT\(depth 4, hidden 128"):
        ad.load_adapter(wider, tmp_path / "a")
    other_weights = tiny_dit(seed=7)  # same shapes, other weights
    with pytest.raises(ConfigError, match=r"sha256 [0-9a-f]{12}, but this model .* has weights sha256 [0-9a-f]{12}"):
        ad.load_adapter(other_weights, tmp_path / "a")
    assert not ad.adapters_of(other_weights)  # nothing was injected
    with pytest.warns(UserWarning, match="trained on DiT-T/4 run A"):
        ad.load_adapter(other_weights, tmp_path / "a", strict_base=False)
    for scale in ("abc", None, True, float("nan")):
        with pytest.raises(ConfigError, match="weight"):
            ad.load_adapter(fresh_base(model), tmp_path / "a", scale=scale)
    with pytest.raises(ConfigError, match="no adapter there"):
        ad.load_adapter(fresh_base(model), tmp_path)


def test_find_adapter_and_lora_flag_spec(tmp_path):
    model = ad.apply_lora(tiny_dit(), 2)
    ad.save_adapter(model, tmp_path / "run" / "checkpoints" / "step_0000002" / "adapter")
    ad.save_adapter(model, tmp_path / "run" / "checkpoints" / "step_0000010" / "ema_adapter")
    found = ad.find_adapter(tmp_path / "run")
    assert found == tmp_path / "run" / "checkpoints" / "step_0000010" / "ema_adapter" / ad.ADAPTER_WEIGHTS
    plain = fresh_base(model)
    assert ad.load_adapter(plain, tmp_path / "run") == "run"  # named after the run, not ema_adapter
    assert ad.load_adapter(plain, found, name="again") == "again"
    assert ad.parse_adapter_spec("runs/a:0.7") == ("runs/a", 0.7)
    assert ad.parse_adapter_spec("runs/a") == ("runs/a", 1.0)
    with pytest.raises(ConfigError, match="not a number"):
        ad.parse_adapter_spec("runs/a:heavy")


def test_bf16_base_keeps_hash_and_trains_adapters_in_fp32():
    model = tiny_dit()
    digest = ad.base_sha256(model)
    ad.apply_lora(model, 4, base_dtype=torch.bfloat16)
    assert model.blocks[0].attn.qkv.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in ad.adapter_parameters(model))
    assert ad.base_sha256(model) == digest
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t, y).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ad.adapter_parameters(model))


# ---- diffusers layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_diffusers_layout_export_then_import_is_exact(tmp_path, variant):
    model = ad.apply_lora(tiny_dit(), 4, alpha=2, targets="attn,mlp,adaLN,final", variant=variant)
    randomize_adapters(model, 1)
    adapted = run(model)
    file = ad.export_lora_diffusers(model, tmp_path / "d")
    keys = load_file(str(file))
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight" in keys
    assert "transformer.proj_out_2.lora_A.weight" in keys and not any("qkv" in k for k in keys)
    assert ("transformer.transformer_blocks.3.attn1.to_v.lora_magnitude_vector" in keys) == (variant == "dora")
    base = fresh_base(model)
    ad.load_adapter(base, tmp_path / "d")
    assert torch.equal(run(base), adapted)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_diffusers_loads_the_export_and_its_own_lora_imports(tmp_path, variant, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers.loaders import PeftAdapterMixin
    from ditkit.interop.diffusers_format import export_diffusers

    diffusers.utils.logging.set_verbosity_error()

    class DiTWithLora(PeftAdapterMixin, diffusers.DiTTransformer2DModel):  # DiT has no LoRA loader of its own
        pass

    model = tiny_dit()
    export_diffusers(model, tmp_path / "base")
    ad.apply_lora(model, 4, targets="attn,mlp,adaLN,final", variant=variant)
    randomize_adapters(model, 2)
    adapted = run(model)
    ad.export_lora_diffusers(model, tmp_path / "lora")
    theirs = DiTWithLora.from_pretrained(tmp_path / "base").eval()
    theirs.load_lora_adapter(tmp_path / "lora", weight_name=ad.DIFFUSERS_LORA_WEIGHTS, prefix="transformer", adapter_name="x")
    x, t, y = inputs()
    with torch.no_grad():
        assert (theirs(x, timestep=t, class_labels=y).sample - adapted).abs().max() < 1e-5

    # A LoRA trained in diffusers has separate to_q/to_k/to_v factors and its own alpha: imported
    # block-diagonally into the fused qkv, the outputs still agree.
    native = DiTWithLora.from_pretrained(tmp_path / "base").eval()
    from peft import LoraConfig

    native.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v", "to_out.0", "ff.net.2"]), "mine")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        want = native(x, timestep=t, class_labels=y).sample
    native.save_lora_adapter(tmp_path / "native", adapter_name="mine", weight_name=ad.DIFFUSERS_LORA_WEIGHTS)
    ours = fresh_base(model)
    ad.load_adapter(ours, tmp_path / "native")
    info = ad.adapters_of(ours)["native"]
    assert info.rank_pattern == {f"blocks.{i}.attn.qkv": 4 for i in range(4)}  # to_q + to_v, rank 2 each
    assert (run(ours) - want).abs().max() < 1e-5


# ---- training: bitwise resume ------------------------------------------------------------------


def _train(model, optimizer, steps: int, first_step: int) -> None:
    objective = FlowMatching()
    model.train()
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(step)
        x0 = torch.randn(4, 1, 16, 16, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = objective.loss(model, x0, y, generator=g).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_two_plus_two_steps_after_saving_equal_four_steps_bitwise(tmp_path):
    base = tiny_dit(learn_sigma=False, class_dropout_prob=0.0)

    def start():
        torch.manual_seed(0)  # peft draws A from the global RNG (the trainer seeds it before building)
        model = ad.apply_lora(fresh_base_like(base), 4, targets="attn,mlp,adaLN", dropout=0.0)
        return model, torch.optim.AdamW(ad.adapter_parameters(model), lr=1e-2, weight_decay=0.01)

    straight, opt = start()
    _train(straight, opt, 4, 0)

    first, opt = start()
    _train(first, opt, 2, 0)
    ad.save_adapter(first, tmp_path / "ckpt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    resumed, opt = start()
    ad.restore_adapter(resumed, tmp_path / "ckpt")  # checks settings and base hash, then copies
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _train(resumed, opt, 2, 2)
    mine, want = ad.adapter_state_dict(resumed), ad.adapter_state_dict(straight)
    assert set(mine) == set(want)
    assert all(torch.equal(mine[k], want[k]) for k in want)
    assert any((want[k] != 0).any() for k in want if "lora_B" in k)  # it did train
    assert torch.equal(ad.base_state_dict(resumed)["blocks.0.attn.qkv.weight"], base.state_dict()["blocks.0.attn.qkv.weight"])
    other = ad.apply_lora(fresh_base_like(base), 4, targets="attn")
    with pytest.raises(ConfigError, match="same --lora-rank/--lora-targets"):
        ad.load_adapter_state_dict(other, load_file(str(tmp_path / "ckpt" / ad.ADAPTER_WEIGHTS)))
    with pytest.raises(ConfigError, match="saved with target_modules"):
        ad.restore_adapter(other, tmp_path / "ckpt")
    shifted = fresh_base_like(base)
    with torch.no_grad():
        shifted.blocks[0].mlp.fc2.bias.add_(1e-3)
    ad.apply_lora(shifted, 4, targets="attn,mlp,adaLN")
    with pytest.raises(ConfigError, match="resume from the same --init-from"):
        ad.restore_adapter(shifted, tmp_path / "ckpt")


def fresh_base_like(source) -> torch.nn.Module:
    model = build_dit("DiT-T/4", input_size=16, in_channels=1, num_classes=10, timestep_freq_shift=1.0,
                      learn_sigma=False, class_dropout_prob=0.0)
    model.load_state_dict(source.state_dict())
    return model


def test_warning_free_injection():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad.apply_lora(tiny_dit(), 2)


def test_base_hash_follows_the_weights_and_ignores_adapters():
    model = tiny_dit()
    digest = ad.base_sha256(model)
    assert digest == ad.base_sha256(tiny_dit()) and digest != ad.base_sha256(tiny_dit(seed=1))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[0].attn.proj.bias.add_(1.0)  # in place: the remembered digest must not be reused
    assert ad.base_sha256(model) != digest
    model.load_state_dict(original)
    assert ad.base_sha256(model) == digest
    ad.apply_lora(model, 2)
    randomize_adapters(model, 0)
    assert ad.base_sha256(model) == digest


def test_presets_reach_the_denoiser_and_text_encoder_of_a_prompt_model():
    """PromptDiT keeps its DiT under ``dit.`` and its trained encoder under ``text_encoder.``: the
    presets name the denoiser's layers (not the encoder's), ``text_attn`` the encoder's attention."""
    from ditkit.adapters import resolve_targets
    from ditkit.builders import build_model
    from ditkit.recipes import get_recipe

    cfg = get_recipe("shapes_captions")
    cfg.data.vocab_size = 100
    model = build_model(cfg)
    attn = resolve_targets(model, "attn")
    assert attn and all(n.startswith("dit.blocks.") for n in attn)
    assert all(n.startswith("dit.") for n in resolve_targets(model, "mlp,adaLN,cross_attn"))
    text = resolve_targets(model, "text_attn")
    assert text and all(n.startswith("text_encoder.blocks.") and n.split(".")[-1] in ("qkv", "proj") for n in text)

"""Whole modules trained beside LoRA (``--lora-train-modules``, peft's ``modules_to_save``; issue 19):
only the adapter and the label-table copy train, the base and its files stay untouched, the copy
is saved in the adapter file and resumes bitwise, sampling uses it, unload gives the base back
exactly, merge folds it in, stacking two copies is refused, diffusers export refuses it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

import ditkit  # noqa: E402
import ditkit.train.loop as loop  # noqa: E402
from ditkit import adapters as ad  # noqa: E402
from ditkit.checkpoint_io import latest_checkpoint  # noqa: E402
from ditkit.cli import main  # noqa: E402
from ditkit.errors import ConfigError  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_adapters import fresh_base, inputs, run, tiny_dit  # noqa: E402

TABLE = "y_embedder.embedding_table"


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _labelled(seed: int = 0) -> torch.nn.Module:
    """A tiny DiT with an adapter on attn + the label table, every trained tensor made random."""
    model = tiny_dit()
    ad.apply_lora(model, 4, targets="attn", train_modules="labels")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.adapter_parameters(model, "default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ---- unit: ditkit.adapters ---------------------------------------------------------------------


def test_only_the_adapter_and_the_label_copy_train():
    model = tiny_dit()
    before = {k: v.clone() for k, v in ad.base_state_dict(model).items()}
    plain = run(model)
    ad.apply_lora(model, 4, targets="attn", train_modules="labels")
    assert torch.equal(run(model), plain)  # the copy starts equal to the table, B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert f"{TABLE}.modules_to_save.default.weight" in trainable
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in trainable)
    optimizer = torch.optim.AdamW(ad.adapter_parameters(model), lr=1e-2, weight_decay=0.0)
    x, t, y = inputs()  # labels 0, 7 and 10 (the null class); eval mode: no label dropout
    for _ in range(2):
        optimizer.zero_grad()
        model(x, t, y).square().mean().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    after = ad.base_state_dict(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # base untouched
    copy = model.get_parameter(f"{TABLE}.modules_to_save.default.weight")
    changed = (copy - before[f"{TABLE}.weight"]).abs().sum(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == [0, 7, 10]  # exactly the rows of the batch's labels moved


def test_labels_preset_per_family_and_one_line_errors():
    from ditkit.models.audio_dit import build_audio_dit
    from ditkit.models.latte import build_latte
    from ditkit.models.prompt_dit import PromptDiT, PROMPT_DIT_PRESETS
    from ditkit.models.text_dit import build_text_dit

    for model in (tiny_dit(), build_latte("Latte-T/4", num_classes=3), build_audio_dit("AudioDiT-T/2", num_classes=3),
                  build_text_dit("TextDiT-T", vocab_size=20, num_classes=3)):
        assert ad.resolve_train_modules(model, "labels") == [TABLE], type(model).__name__
        assert ad.resolve_train_modules(model, "") == []
    prompt = PromptDiT(**PROMPT_DIT_PRESETS["T2I-CrossDiT-T/4"], input_size=8, in_channels=1)
    with pytest.raises(ConfigError) as err:
        ad.apply_lora(prompt, 2, targets=r"dit\.blocks\.\d+\.cross_attn\.proj", train_modules="labels")
    assert "--lora-train-modules labels" in _one_line(err) and "PromptDiT" in str(err.value)
    assert not ad.adapters_of(prompt)  # refused before anything was injected
    with pytest.raises(ConfigError) as err:
        ad.apply_lora(tiny_dit(num_classes=0), 2, train_modules="labels")  # an unconditional DiT has no table
    assert "no class-label embedding" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        ad.apply_lora(tiny_dit(), 2, targets="attn", train_modules=r"blocks\.0\.attn\.qkv")  # LoRA and whole
    assert "overlaps LoRA layer blocks.0.attn.qkv" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        ad.apply_lora(tiny_dit(), 2, train_modules="nothing_here")
    assert "matches no module" in _one_line(err)
    # a pattern names any module with weights
    assert ad.resolve_train_modules(tiny_dit(), r"final_layer\.linear") == ["final_layer.linear"]


def test_save_load_stack_unload_merge(tmp_path):
    base = tiny_dit()
    plain = run(base)
    model = _labelled()
    trained = run(model)
    assert not torch.allclose(trained, plain, atol=1e-4)
    ad.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(str(file))
    assert torch.equal(saved[f"{TABLE}.weight"], model.get_parameter(f"{TABLE}.modules_to_save.default.weight"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [TABLE] and config["ditkit"]["train_modules"] == ["labels"]

    other = fresh_base(model)
    assert ad.base_sha256(other) == ad.base_sha256(model)  # the wrapper does not change the base hash
    name = ad.load_adapter(other, tmp_path / "a")
    assert torch.equal(run(other), trained)
    ad.set_adapter_scales(other, {name: 0.0})
    assert torch.equal(run(other), plain)  # weight 0: the original table too
    ad.set_adapter_scales(other, {name: 1.0})

    # a second adapter holding a copy of the same table: refused at weight != 0, allowed at 0
    with pytest.raises(ConfigError) as err:
        ad.load_adapter(other, tmp_path / "a", name="b")
    assert "both train y_embedder.embedding_table" in _one_line(err) and "b" not in ad.adapters_of(other)
    ad.load_adapter(other, tmp_path / "a", name="b", scale=0.0)
    with pytest.raises(ConfigError):
        ad.set_adapter_scales(other, {"b": 1.0})
    ad.set_adapter_scales(other, {name: 0.0, "b": 1.0})  # switch, as the server does
    assert torch.equal(run(other), trained)
    ad.unload_adapters(other, ["b"])
    assert type(other.get_submodule(TABLE)).__name__ == "ModulesToSaveWrapper"  # still held by the first
    ad.set_adapter_scales(other, {name: 1.0})
    assert torch.equal(run(other), trained)
    ad.unload_adapters(other)
    assert type(other.get_submodule(TABLE)) is torch.nn.Embedding and torch.equal(run(other), plain)
    assert set(other.state_dict()) == set(base.state_dict())

    ad.load_adapter(other, tmp_path / "a")
    ad.merge_adapters(other)
    assert set(other.state_dict()) == set(base.state_dict())
    assert torch.allclose(run(other), trained, atol=1e-5)
    assert torch.equal(other.state_dict()[f"{TABLE}.weight"], saved[f"{TABLE}.weight"])

    # the copy alone (LoRA B = 0): its rows are what sampling uses, at any weight != 0
    rows = tiny_dit()
    ad.apply_lora(rows, 2, targets="attn", train_modules="labels")
    with torch.no_grad():
        rows.get_parameter(f"{TABLE}.modules_to_save.default.weight")[7] += 1.0  # class 7 only
    changed = (run(rows) - plain).flatten(1).abs().amax(dim=1) > 0  # inputs' labels: 0, 7, 10
    assert changed.tolist() == [False, True, False]
    ad.set_adapter_scales(rows, {"default": 0.25})
    assert ((run(rows) - plain).flatten(1).abs().amax(dim=1) > 0).tolist() == [False, True, False]

    # an adapter without train modules stays as before: no wrapper, no modules_to_save in the config
    plain_lora = tiny_dit()
    ad.apply_lora(plain_lora, 4, targets="attn")
    ad.save_adapter(plain_lora, tmp_path / "p")
    assert "modules_to_save" not in json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert not any("modules_to_save" in k for k in plain_lora.state_dict())


def test_diffusers_export_refuses_a_whole_module_and_peft_reads_the_file(tmp_path):
    model = _labelled()
    with pytest.raises(ConfigError) as err:
        ad.export_lora_diffusers(model, tmp_path)
    assert "--lora-train-modules labels" in _one_line(err)
    # peft's own loader reads the ditkit file (keys as peft's get_peft_model_state_dict writes them)
    import peft

    ad.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    target = tiny_dit()
    peft.inject_adapter_in_model(peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                                 target_modules=config["target_modules"],
                                                 modules_to_save=config["modules_to_save"]), target)
    result = peft.set_peft_model_state_dict(target, load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert torch.equal(run(target), run(model))


def test_bf16_base_keeps_the_copy_in_fp32():
    model = tiny_dit()
    ad.apply_lora(model, 2, targets="attn", train_modules="labels", base_dtype=torch.bfloat16)
    assert model.get_parameter(f"{TABLE}.original_module.weight").dtype == torch.bfloat16
    assert model.get_parameter(f"{TABLE}.modules_to_save.default.weight").dtype == torch.float32


# ---- through the trainer, pipelines and the CLI ------------------------------------------------


def _tiny(results_dir, run_name, **train):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(results_dir), run_name
    cfg.data.num_items, cfg.data.hflip = 40, True
    cfg.model.class_dropout_prob = 0.5
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = 8, 2
    cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr_schedule = 6, 2, "cosine"
    cfg.train.log_every, cfg.train.ckpt_every, cfg.train.lr = 2, 100, 1e-2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _files_sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sample(pipe, n=3):
    return pipe(class_labels=list(range(n)), num_inference_steps=3, guidance_scale=1.0, seed=0).tensors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run (2 steps) and a LoRA run with the label table (rank 4, 6 steps); the base's files
    hashed before the LoRA run, and the LoRA run's log."""
    root = tmp_path_factory.mktemp("lora_modules")
    base = loop.train(_tiny(root, "base", max_steps=2), log=lambda m: None)
    before = _files_sha(base.run_dir / "checkpoints")
    messages: list[str] = []
    lora = loop.train(_tiny(root, "labels", init_from=str(base.run_dir), lora_rank=4, lora_train_modules="labels"),
                      log=messages.append)
    return root, base.run_dir, lora.run_dir, before, messages


def test_a_lora_run_trains_the_label_copy_only_in_its_adapter(runs):
    _, base_dir, lora_dir, before, messages = runs
    assert _files_sha(base_dir / "checkpoints") == before  # the base's files are untouched
    ckpt = latest_checkpoint(lora_dir)
    assert not (ckpt / "model.safetensors").exists()
    adapter_file = ckpt / "adapter" / "adapter_model.safetensors"
    adapter = load_file(str(adapter_file))
    base_table = load_file(str(latest_checkpoint(base_dir) / "ema.safetensors"))[f"{TABLE}.weight"]
    assert not torch.equal(adapter[f"{TABLE}.weight"], base_table)  # the copy trained
    full = (latest_checkpoint(base_dir) / "model.safetensors").stat().st_size
    assert adapter_file.stat().st_size < 0.2 * full  # still small
    # the trainable count at the start counts the table: LoRA factors + (classes + 1) x hidden
    lora_only = sum(v.numel() for k, v in adapter.items() if ".lora_" in k)
    expected = lora_only + base_table.numel()
    (line,) = [m for m in messages if "trainable" in m]
    assert f"{expected / 1e6:.3f}M trainable" in line
    # the run's pipeline: base + adapter with the trained rows; unloading gives the base exactly
    pipe, base = ditkit.load(lora_dir, device="cpu"), ditkit.load(base_dir, device="cpu")
    plain = _sample(base)
    (name,) = pipe.loras
    assert torch.equal(pipe.model.get_parameter(f"{TABLE}.modules_to_save.{name}.weight"),
                       load_file(str(ckpt / "ema_adapter" / "adapter_model.safetensors"))[f"{TABLE}.weight"])
    adapted = _sample(pipe)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    pipe.unload_lora()
    assert torch.equal(_sample(pipe), plain)
    base.load_lora(lora_dir)  # --lora RUN on the base it was trained on
    assert torch.allclose(_sample(base), adapted, atol=1e-6)


def test_resume_with_the_label_copy_is_bitwise_exact(tmp_path, runs):
    _, base_dir, lora_dir, _, _ = runs
    cfg = dict(init_from=str(base_dir), lora_rank=4, lora_train_modules="labels")
    stopped = loop.train(_tiny(tmp_path, "resumed", **cfg), stop_at_step=3, log=lambda m: None)
    assert stopped.step == 3
    finished = loop.train(_tiny(tmp_path, "resumed", **cfg), resume=stopped.run_dir, log=lambda m: None)
    ref, got = latest_checkpoint(lora_dir), latest_checkpoint(finished.run_dir)
    for folder in ("adapter", "ema_adapter"):
        a = load_file(str(ref / folder / "adapter_model.safetensors"))
        b = load_file(str(got / folder / "adapter_model.safetensors"))
        assert f"{TABLE}.weight" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    # resuming without the flag is refused, naming it
    with pytest.raises(ConfigError) as err:
        loop.train(_tiny(tmp_path, "resumed", init_from=str(base_dir), lora_rank=4, max_steps=7),
                   resume=finished.run_dir, log=lambda m: None)
    assert "--lora-train-modules" in _one_line(err)


def test_cli_merge_info_export_and_flag(tmp_path, runs, capsys):
    root, base_dir, lora_dir, _, _ = runs
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(lora_dir), "--out", str(merged)]) == 0
    lora_pipe, merged_pipe = ditkit.load(lora_dir, device="cpu"), ditkit.load(merged, device="cpu")
    assert merged_pipe.loras == {} and merged_pipe.cfg.train.lora_train_modules == ""
    assert torch.allclose(_sample(merged_pipe), _sample(lora_pipe), atol=1e-5)
    capsys.readouterr()
    assert main(["lora", "info", str(lora_dir)]) == 0
    out = capsys.readouterr().out
    assert "whole modules y_embedder.embedding_table" in out and "labels" in out
    assert main(["lora", "export", str(lora_dir), str(tmp_path / "x")]) != 0
    assert "--lora-train-modules labels" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["lora", "export", str(lora_dir), str(tmp_path / "p"), "--peft-only"]) == 0
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "p" / "pytorch_lora_weights.safetensors").exists()
    # the flag: needs --lora-rank; on a prompt model "labels" is refused before training
    code = main(["train", "--recipe", "shapes_tiny", "--init-from", str(base_dir), "--lora-train-modules", "labels",
                 "--results-dir", str(tmp_path)])
    assert code != 0 and "--lora-train-modules labels trains modules beside LoRA adapters" in capsys.readouterr().err

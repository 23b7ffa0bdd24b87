"""LoRA fine-tuning wired through the trainer, checkpoints, pipelines, the CLI and the server
(issue 19): bitwise resume, adapter-only checkpoints, ``ditkit.load`` of a LoRA run, ``--lora``
stacking, ``ditkit lora merge/export``, and the one-line errors for bad input."""

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")  # the lora extra
from safetensors.torch import load_file

import ditkit
import ditkit.train.loop as loop
from ditkit.checkpoint_io import Checkpoint, latest_checkpoint, load_training_state
from ditkit.cli import main
from ditkit.errors import ConfigError
from ditkit.recipes import get_recipe


def _tiny(results_dir, run_name, **train):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(results_dir), run_name
    # 40 images, micro-batch 4 (batch 8 in 2 accumulation steps): step 3 stops mid-epoch
    cfg.data.num_items, cfg.data.hflip = 40, True
    cfg.model.class_dropout_prob = 0.5
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = 8, 2
    cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr_schedule = 6, 2, "cosine"
    cfg.train.log_every, cfg.train.ckpt_every, cfg.train.lr = 2, 100, 1e-2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _quiet(message):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run (2 steps of full training) and a LoRA run on it (rank 4, 6 steps)."""
    root = tmp_path_factory.mktemp("lora")
    base = loop.train(_tiny(root, "base", max_steps=2), log=_quiet)
    lora = loop.train(_tiny(root, "lora", init_from=str(base.run_dir), lora_rank=4), log=_quiet)
    return root, base.run_dir, lora.run_dir


def _sample(pipe, n=2):
    return pipe(class_labels=list(range(n)), num_inference_steps=3, guidance_scale=1.0, seed=0).tensors


def test_lora_checkpoint_holds_adapters_only_and_the_base_stays_frozen(runs):
    _, base_dir, lora_dir = runs
    ckpt = latest_checkpoint(lora_dir)
    assert ckpt is not None and ckpt.name == "step_0000006"
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "ema.safetensors").exists()
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained
    config = json.loads((ckpt / "ema_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["ditkit"]["base_model"] == str(base_dir)
    size = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    full = (latest_checkpoint(base_dir) / "model.safetensors").stat().st_size
    assert size < 0.2 * full
    # the whole run's frozen base equals the base run's EMA weights (what --init-from loads)
    pipe = ditkit.load(lora_dir, device="cpu")
    base_ema = load_file(str(latest_checkpoint(base_dir) / "ema.safetensors"))
    from ditkit.adapters import base_state_dict

    mine = base_state_dict(pipe.model)
    assert all(torch.equal(mine[k], base_ema[k]) for k in base_ema)


def test_lora_resume_is_bitwise_exact(tmp_path, runs):
    _, base_dir, lora_dir = runs
    stopped = loop.train(_tiny(tmp_path, "resumed", init_from=str(base_dir), lora_rank=4), stop_at_step=3, log=_quiet)
    assert stopped.step == 3 and load_training_state(stopped.checkpoint)["data"]["position"] != 0
    finished = loop.train(_tiny(tmp_path, "resumed", init_from=str(base_dir), lora_rank=4), resume=stopped.run_dir, log=_quiet)
    assert finished.step == 6
    ref, got = latest_checkpoint(lora_dir), latest_checkpoint(finished.run_dir)
    for folder in ("adapter", "ema_adapter"):
        a = load_file(str(ref / folder / "adapter_model.safetensors"))
        b = load_file(str(got / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    ref_opt, opt = load_training_state(ref)["optimizer"], load_training_state(got)["optimizer"]
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(ref_opt["state"].values(), opt["state"].values()))


def test_load_of_a_lora_run_applies_its_ema_adapter_and_records_it(runs):
    _, base_dir, lora_dir = runs
    pipe = ditkit.load(lora_dir, device="cpu")
    assert pipe.loras == {"lora": 1.0} and pipe.weights == "ema"
    meta = pipe(class_labels=[0], num_inference_steps=2, guidance_scale=1.0, seed=0).metadata
    (entry,) = json.loads(meta["lora"])
    ema_file = latest_checkpoint(lora_dir) / "ema_adapter" / "adapter_model.safetensors"
    import hashlib

    assert entry["name"] == "lora" and entry["scale"] == 1.0 and entry["rank"] == 4
    assert entry["sha256"] == hashlib.sha256(ema_file.read_bytes()).hexdigest()
    # the same as the base with the adapter stacked by hand; different from the base alone
    base = ditkit.load(base_dir, device="cpu")
    plain = _sample(base)
    name = base.load_lora(lora_dir, scale=1.0)
    assert name == "lora" and torch.allclose(_sample(base), _sample(pipe), atol=1e-6)
    assert not torch.allclose(_sample(base), plain, atol=1e-4)
    with pytest.raises(ConfigError, match="taken by torch"):  # peft's ModuleDict would break on it
        base.load_lora(lora_dir, scale=0.5, name="half")
    base.load_lora(lora_dir, scale=0.5, name="half_again")  # stacking: 1.5 x the update
    stacked = _sample(base)
    base.unload_lora("half_again")
    assert not torch.allclose(stacked, _sample(pipe), atol=1e-4)
    base.unload_lora()
    assert base.loras == {} and torch.allclose(_sample(base), plain, atol=1e-6)


def test_sample_cli_lora_flag_and_merge_and_export(tmp_path, runs, capsys):
    _, base_dir, lora_dir = runs
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(base_dir), "--lora", f"{lora_dir}:0.5", "--num-samples", "2",
                 "--num-sampling-steps", "2", "--out-dir", str(out), "--device", "cpu"]) == 0
    from PIL import Image

    png = sorted(out.glob("*.png"))[0]
    (entry,) = json.loads(Image.open(png).text["lora"])
    assert entry["name"] == "lora" and entry["scale"] == 0.5

    # merge: a standard run whose outputs equal the LoRA run's
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(base_dir), str(lora_dir), "--out", str(merged)]) == 0
    ckpt = Checkpoint.open(merged)
    assert (ckpt.dir / "model.safetensors").is_file() and ckpt.config.train.lora_rank == 0
    assert json.loads((merged / "merged_from.json").read_text())["adapters"][0]["name"] == "lora"
    lora_pipe, merged_pipe = ditkit.load(lora_dir, device="cpu"), ditkit.load(merged, device="cpu")
    assert merged_pipe.loras == {}
    assert torch.allclose(_sample(merged_pipe), _sample(lora_pipe), atol=1e-5)

    # export: diffusers' file loads back onto the base with the same outputs
    exported = tmp_path / "exported"
    assert main(["lora", "export", str(lora_dir), str(exported)]) == 0
    assert (exported / "pytorch_lora_weights.safetensors").is_file() and (exported / "adapter_config.json").is_file()
    keys = load_file(str(exported / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("transformer.transformer_blocks.0.attn1.to_q.lora_A") for k in keys)
    base = ditkit.load(base_dir, device="cpu")
    base.load_lora(exported / "pytorch_lora_weights.safetensors")
    assert torch.allclose(_sample(base), _sample(lora_pipe), atol=1e-5)
    capsys.readouterr()


# ---- bad input: one-line errors ----------------------------------------------------------------


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_lora_rank_needs_init_from_and_fits_the_layers(tmp_path, runs, capsys):
    _, base_dir, _ = runs
    with pytest.raises(ConfigError) as err:
        _tiny(tmp_path, "x", lora_rank=4).validate()
    assert "--init-from" in _one_line(err)
    code = main(["train", "--recipe", "shapes_tiny", "--lora-rank", "4", "--results-dir", str(tmp_path)])
    assert code != 0 and "--lora-rank 4 adapts a pretrained base: give --init-from" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError) as err:
        loop.train(_tiny(tmp_path, "wide", init_from=str(base_dir), lora_rank=1000), log=_quiet)
    text = _one_line(err)
    assert "--lora-rank 1000" in text and "width" in text


def test_bad_lora_input_at_sampling(tmp_path, runs):
    root, base_dir, lora_dir = runs
    # a non-numeric weight fails before any weights load
    with pytest.raises(ConfigError) as err:
        ditkit.load(base_dir, device="cpu", lora=[f"{lora_dir}:heavy"])
    assert "not a number" in _one_line(err)
    # an adapter trained on another base (same shapes, other weights): names both hashes
    other = loop.train(_tiny(root, "other_base", max_steps=1), log=_quiet)
    pipe = ditkit.load(other.run_dir, device="cpu")
    with pytest.raises(ConfigError) as err:
        pipe.load_lora(lora_dir)
    text = _one_line(err)
    assert "sha256" in text and str(base_dir) in text
    assert pipe.loras == {}
    # an adapter on a model without such layers (a deeper adapter on a shallower base)
    cfg = _tiny(root, "deep_base", max_steps=1)
    cfg.model.depth = 6
    deep = loop.train(cfg, log=_quiet)
    from ditkit.adapters import apply_lora, save_adapter

    deep_pipe = ditkit.load(deep.run_dir, device="cpu")
    apply_lora(deep_pipe.model, 2, targets=r"blocks\.5\.mlp\.fc1")
    save_adapter(deep_pipe.model, tmp_path / "deep_adapter")
    with pytest.raises(ConfigError) as err:
        ditkit.load(base_dir, device="cpu").load_lora(tmp_path / "deep_adapter")
    assert "blocks.5.mlp.fc1" in _one_line(err) and "does not have" in str(err.value)
    # a LoRA run whose base is gone
    moved = tmp_path / "lora_copy"
    shutil.copytree(lora_dir, moved)
    cfg_path = latest_checkpoint(moved) / "config.json"
    data = json.loads(cfg_path.read_text())
    data["train"]["init_from"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        ditkit.load(moved, device="cpu")
    assert "is not there" in _one_line(err)
    # a plain run's weights cannot be read as a LoRA checkpoint's and vice versa
    from ditkit.checkpoint_io import load_weights

    with pytest.raises(ConfigError) as err:
        load_weights(latest_checkpoint(lora_dir))
    assert "LoRA run" in _one_line(err)


def test_server_loads_named_adapters_once_and_a_request_picks_one(runs):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import asyncio
    import base64
    import io

    from PIL import Image

    from ditkit.serve.app import create_app
    from ditkit.serve.launch import load_models
    from ditkit.serve.limits import ServeLimits

    _, base_dir, lora_dir = runs
    with pytest.raises(ConfigError) as err:  # bad specs fail before anything loads
        load_models([f"base={base_dir}"], device="cpu", loras=[f"style={lora_dir}:strong"])
    assert "not a number" in _one_line(err)
    models = load_models([f"base={base_dir}"], device="cpu", loras=[f"style={lora_dir}:1"])
    app = create_app(models, ServeLimits(max_queue=4, request_timeout_s=30))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            listed = (await c.get("/v1/models")).json()["models"][0]["loras"]
            body = {"model": "base", "class_labels": [0, 1], "num_images": 2, "steps": 3, "cfg_scale": 1.0, "seed": 0}
            plain = await c.post("/v1/images", json=body)
            styled = await c.post("/v1/images", json={**body, "lora": "style"})
            unknown = await c.post("/v1/images", json={**body, "lora": "nope"})
            again = await c.post("/v1/images", json=body)
            return listed, plain, styled, unknown, again

    try:
        listed, plain, styled, unknown, again = asyncio.run(go())
    finally:
        app.state.ditkit.close()
    assert listed == [{"name": "style", "weight": 1.0}]
    assert plain.status_code == styled.status_code == again.status_code == 200, styled.text
    assert unknown.status_code == 422 and "'nope' is not an adapter" in unknown.text and "style" in unknown.text

    def pixels(response):
        return [Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))).tobytes() for i in response.json()["images"]]

    assert pixels(plain) == pixels(again) != pixels(styled)
    assert "lora" not in plain.json()["metadata"] and json.loads(styled.json()["metadata"]["lora"])[0]["name"] == "style"
    # the adapter served is the LoRA run's: same images as ditkit.load of that run
    ref = ditkit.load(lora_dir, device="cpu")(class_labels=[0, 1], num_inference_steps=3, guidance_scale=1.0, seed=0)
    from ditkit.media import to_uint8

    assert [p.tobytes() for p in to_uint8(ref.tensors)] == pixels(styled)


def test_bf16_base_keeps_the_fp32_base_hash_and_needs_bf16_autocast(tmp_path, runs):
    _, base_dir, _ = runs
    with pytest.raises(ConfigError) as err:
        loop.train(_tiny(tmp_path, "bad", init_from=str(base_dir), lora_rank=4, lora_base_dtype="bf16", precision="fp32"),
                   log=_quiet)
    assert "--precision bf16" in _one_line(err) and not (tmp_path / "bad").exists()
    run = loop.train(_tiny(tmp_path, "bf16", init_from=str(base_dir), lora_rank=4, lora_base_dtype="bf16", precision="bf16",
                           max_steps=2), log=_quiet)
    from ditkit.checkpoint_io import latest_checkpoint as latest

    config = json.loads((latest(run.run_dir) / "adapter" / "adapter_config.json").read_text())
    pipe = ditkit.load(base_dir, device="cpu")
    from ditkit.adapters import base_sha256

    assert config["ditkit"]["base_sha256"] == base_sha256(pipe.model)  # the fp32 weights' hash, not the bf16 copy's
    pipe.load_lora(run.run_dir)  # loads onto the fp32 base without a hash error
    assert pipe.loras == {"bf16": 1.0}

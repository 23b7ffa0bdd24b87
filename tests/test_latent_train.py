"""Latent diffusion and fine-tuning through the real training loop and command line:
``ditkit train --vae`` trains on cached latents and samples through the decoder, resumes exactly,
reuses its latent cache; ``ditkit train --init-from`` starts from an imported official checkpoint
with another class count."""

import argparse
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ditkit.cli import main
from ditkit.config import load_config

diffusers = pytest.importorskip("diffusers")


def save_tiny_vae(folder, seed=0):
    """A tiny random AutoencoderKL (downsampling 4, 4 latent channels) saved as a local folder."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215,
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    from ditkit.eval import ClassifierConfig, model_eval

    monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ditkit-cache"))
    monkeypatch.setattr(model_eval, "CLASSIFIER_CONFIG", ClassifierConfig(width=8, feature_dim=16, epochs=2))


TINY = ["train", "--recipe", "shapes_tiny", "--model", "DiT-T/2", "--set", "data.num_items=64",
        "--global-batch-size", "8", "--set", "sample.num_sampling_steps=3"]


def test_train_with_a_vae_end_to_end_then_sample_decoded_images(tmp_path, vae_dir, capsys):
    args = [*TINY, "--vae", str(vae_dir), "--max-steps", "4", "--sample-every", "4", "--results-dir", str(tmp_path)]
    assert main([*args, "--run-name", "lat", "--set", "train.eval_every=4", "--set", "train.eval_samples=10"]) == 0
    run = tmp_path / "lat"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "fd_classifier" in x]
    assert len(evals) == 1 and evals[0]["step"] == 4 and 0 <= evals[0]["conditional_accuracy"] <= 1  # decoded, scored
    cfg = load_config(run)
    assert (cfg.data.vae, cfg.data.latent_channels, cfg.data.vae_downsample) == (str(vae_dir), 4, 4)
    ema = load_file(str(run / "checkpoints" / "step_0000004" / "ema.safetensors"))
    assert ema["x_embedder.proj.weight"].shape == (64, 4, 2, 2) and ema["pos_embed"].shape == (1, 4, 64)  # 4x4x4 latents
    with Image.open(run / "samples" / "step_0000004.png") as grid:  # decoded, not latents
        assert grid.mode == "RGB"
    assert "encoded into" in capsys.readouterr().err

    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run), "--num-samples", "3", "--sampler", "ddim", "--out-dir", str(out)]) == 0
    with Image.open(out / "000001.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB" and im.text["vae"] == str(vae_dir)

    assert main([*args, "--run-name", "again"]) == 0  # same data, VAE and size: the cache is reused
    assert "reused from" in capsys.readouterr().err


def test_latent_training_resumes_bitwise_exactly(tmp_path, vae_dir):
    base = [*TINY, "--vae", str(vae_dir), "--max-steps", "4", "--ckpt-every", "2", "--results-dir", str(tmp_path)]
    assert main([*base, "--run-name", "straight"]) == 0
    assert main([*base, "--run-name", "split", "--stop-at-step", "2"]) == 0
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000004" / name))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step_0000004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_fine_tune_an_imported_checkpoint_with_another_class_count(tmp_path, vae_dir):
    from test_interop_cli import official_style_state_dict

    source = official_style_state_dict()  # DiT-T/2 on 8x8x4 latents, 10 classes
    torch.save({"ema": source, "args": argparse.Namespace(model="DiT-T/2")}, tmp_path / "dit.pt")
    assert main(["import-dit", str(tmp_path / "dit.pt"), "--model", "DiT-T/2", "--image-size", "64", "--out", str(tmp_path / "imp")]) == 0
    # shapes has 4 classes and 16 px images (4x4 latents through the tiny VAE): label table and pos_embed change
    assert main([*TINY, "--vae", str(vae_dir), "--init-from", str(tmp_path / "imp"), "--class-map", "0:3,1:5",
                 "--max-steps", "2", "--results-dir", str(tmp_path), "--run-name", "ft"]) == 0
    record = json.loads((tmp_path / "ft" / "init_from.json").read_text())
    assert record["kind"] == "ditkit" and record["label_rows_copied"] == 2 and record["label_rows_fresh"] == 2
    assert record["pos_embed"].startswith("recomputed")
    weights = load_file(str(tmp_path / "ft" / "checkpoints" / "step_0000002" / "model.safetensors"))
    table, old = weights["y_embedder.embedding_table.weight"], source["y_embedder.embedding_table.weight"]
    assert table.shape == (5, 64)
    # two AdamW steps at lr 1e-3 move a weight by at most ~2e-3; the source rows are ~0.08 apart
    for new, src in ((0, 3), (1, 5), (4, 10)):  # mapped rows, and the null row kept last
        assert (table[new] - old[src]).abs().max() < 5e-3
    assert (table[2] - old[2]).abs().max() > 5e-2  # an unmapped row starts fresh
    assert (weights["blocks.0.attn.qkv.weight"] - source["blocks.0.attn.qkv.weight"]).abs().max() < 5e-3
    state = torch.load(tmp_path / "ft" / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())  # the optimiser started fresh

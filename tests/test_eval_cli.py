"""``ditkit eval`` and evaluation during training, end to end on a tiny run.

The feature classifier is shrunk for speed (``model_eval.CLASSIFIER_CONFIG``); everything else is
the real path: sampling with labels cycling over the classes, FD / precision / recall / accuracy
against the training data, the results JSON, and metrics.jsonl lines during training that leave the
training RNGs untouched."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditkit.cli import main
from ditkit.data import load_dataset
from ditkit.eval import ClassifierConfig
from ditkit.eval import model_eval
from ditkit.recipes import get_recipe

TINY = ["train", "--recipe", "shapes_tiny", "--max-steps", "4", "--ckpt-every", "4", "--log-every", "2",
        "--set", "sample.num_sampling_steps=3", "--set", "model.class_dropout_prob=0.5"]  # dropout: global RNG


@pytest.fixture(autouse=True)
def small_classifier_and_tmp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(model_eval, "CLASSIFIER_CONFIG", ClassifierConfig(width=8, feature_dim=16, epochs=2))
    monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ditkit-cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run with evaluation every 2 steps and without; module scoped (a few seconds)."""
    root = tmp_path_factory.mktemp("results")
    mp = pytest.MonkeyPatch()
    mp.setattr(model_eval, "CLASSIFIER_CONFIG", ClassifierConfig(width=8, feature_dim=16, epochs=2))
    mp.setenv("DITKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ditkit-cache"))
    try:
        assert main([*TINY, "--results-dir", str(root), "--run-name", "eval",
                     "--set", "train.eval_every=2", "--set", "train.eval_samples=12"]) == 0
        assert main([*TINY, "--results-dir", str(root), "--run-name", "plain"]) == 0
    finally:
        mp.undo()
    return root / "eval", root / "plain"


def test_training_logs_eval_metrics_and_leaves_the_training_rngs_alone(runs):
    with_eval, plain = runs
    lines = [json.loads(line) for line in (with_eval / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "fd_classifier" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert m["fd_classifier"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
        assert 0 <= m["conditional_accuracy"] <= 1 and m["eval_samples"] == 12
    assert len([m for m in lines if "loss" in m]) == 2  # the training lines are still there
    for name in ("model.safetensors", "ema.safetensors"):  # evaluation drew no training randomness
        a = load_file(str(with_eval / "checkpoints" / "step_0000004" / name))
        b = load_file(str(plain / "checkpoints" / "step_0000004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_command_samples_scores_and_writes_the_promised_json(runs, tmp_path, capsys):
    run = runs[1]
    out = tmp_path / "r.json"
    code = main(["eval", "--ckpt", str(run), "--num-samples", "12", "--sampler", "ddim", "--num-sampling-steps", "3",
                 "--cfg-scale", "2", "--seed", "5", "--timestep-spacing", "quadratic", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "FD (classifier features)" in printed and "conditional accuracy" in printed and "12 samples" in printed
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == {"fd_classifier", "precision", "recall", "conditional_accuracy"}
    assert results["num_samples"] == 12 and results["labels_given"]
    assert len(results["feature_extractor"]["hash"]) == 16 and results["feature_extractor"]["display_name"] == "FD (classifier features)"
    assert {"ditkit", "torch", "numpy", "python"} <= set(results["versions"])
    s = results["sampling"]
    ema = run / "checkpoints" / "step_0000004" / "ema.safetensors"
    assert s["checkpoint_sha256"] == hashlib.sha256(ema.read_bytes()).hexdigest() and s["step"] == 4
    assert (s["sampler"], s["num_sampling_steps"], s["cfg_scale"], s["seed"]) == ("ddim", 3, 2.0, 5)
    assert s["timestep_spacing"] == "quadratic" and s["labels"] == "cycling over 4 classes"
    assert results["reference"]["dataset"] == "shapes" and results["reference"]["num_images"] == 128

    # default output path: RUN/eval/<step>-<sampler>-<steps>-cfg<scale>-n<N>-seed<seed>.json
    assert main(["eval", "--ckpt", str(run), "--num-samples", "12", "--num-sampling-steps", "2"]) == 0
    assert (run / "eval" / "step_0000004-dpm++-2-cfg2-n12-seed0.json").is_file()


def test_eval_scores_an_npz_and_real_images_beat_noise(runs, tmp_path):
    cfg = get_recipe("shapes_tiny")
    data = load_dataset(cfg.data)
    real = data.images[:64].permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8, the ADM layout
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    labels = data.labels[:64].numpy()
    for name, arr in (("real", real), ("noise", noise)):
        np.savez(tmp_path / f"{name}.npz", arr, labels)
        assert main(["eval", "--npz", str(tmp_path / f"{name}.npz"), "--ckpt", str(runs[1])]) == 0
    real_r = json.loads((tmp_path / "real.eval.json").read_text())
    noise_r = json.loads((tmp_path / "noise.eval.json").read_text())
    assert real_r["sampling"]["samples_sha256"] == hashlib.sha256((tmp_path / "real.npz").read_bytes()).hexdigest()
    assert real_r["metrics"]["fd_classifier"] < noise_r["metrics"]["fd_classifier"]
    assert real_r["metrics"]["precision"] > noise_r["metrics"]["precision"]


def test_clear_errors(runs, tmp_path, capsys):
    assert main(["eval", "--ckpt", str(runs[1]), "--inception-weights", str(tmp_path / "pt_inception.pth")]) == 2
    err = capsys.readouterr().err
    assert "Inception weights not found" in err and "pt_inception-2015-12-05" in err
    assert main(["eval", "--num-samples", "12"]) == 2
    assert "--ckpt" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(runs[1]), "--sampler", "heun"]) == 2
    assert "does not fit a gaussian model" in capsys.readouterr().err


def test_data_flag_swaps_the_reference_but_sampling_stays_the_checkpoints(runs, tmp_path):
    out = tmp_path / "d.json"
    assert main(["eval", "--ckpt", str(runs[1]), "--data", "shapes", "--num-samples", "12", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["reference"]["num_images"] == 2048  # the full procedural set, not the run's 128 images
    s = results["sampling"]
    assert (s["sampler"], s["num_sampling_steps"], s["cfg_scale"]) == ("dpm++", 3, 2.0)  # the checkpoint's settings

"""The ``ditkit`` command end to end on a tiny config, and the promised errors for bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
import ditkit

REPO = Path(__file__).resolve().parents[1]
TINY = ["train", "--recipe", "shapes_tiny", "--max-steps", "4", "--ckpt-every", "2", "--log-every", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    assert main([*TINY, "--results-dir", str(root), "--run-name", "tiny", "--set", "sample.num_sampling_steps=3"]) == 0
    return root / "tiny"


def test_train_writes_checkpoints_config_and_metrics(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["name"] == "DiT-T/4" and saved["sample"]["num_sampling_steps"] == 3
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_sample_writes_grid_pngs_with_metadata_npz_and_trajectory(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "sample", "--ckpt", str(run_dir), "--class-labels", "1", "2", "3", "--num-samples", "6", "--sampler", "ddpm",
        "--num-sampling-steps", "5", "--cfg-scale", "4", "--seed", "10", "--out-dir", str(out), "--npz", "--trajectory",
        "--trajectory-points", "3",
    ])
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{i:06d}.png" for i in range(6)] + ["grid.png", "samples.npz", "trajectory.png"]
    ema_sha = hashlib.sha256((run_dir / "checkpoints" / "step_0000004" / "ema.safetensors").read_bytes()).hexdigest()
    with Image.open(out / "000004.png") as im:
        meta = dict(im.text)
        assert im.size == (16, 16) and im.mode == "RGB"
    assert meta["model"] == "DiT-T/4" and meta["checkpoint_sha256"] == ema_sha and meta["weights"] == "ema"
    assert meta["seed"] == "14" and meta["label"] == "2" and meta["class_name"] == "triangle"
    assert meta["sampler"] == "ddpm" and meta["num_sampling_steps"] == "5" and meta["cfg_scale"] == "4.0"
    assert meta["step"] == "4"
    with Image.open(out / "grid.png") as im:
        assert im.text["labels"] == "1 2 3 1 2 3"
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].tolist() == [1, 2, 3, 1, 2, 3]
        with Image.open(out / "000000.png") as im:
            assert np.array_equal(np.asarray(im), npz["arr_0"][0])
    with Image.open(out / "trajectory.png") as im:
        assert im.text["trajectory_steps"] == "0 2 4"
    assert "wrote" in capsys.readouterr().out


def test_samples_depend_on_seed_not_batch_size_and_ema_is_the_default(run_dir):
    pipe = ditkit.load(run_dir, device="cpu")
    kwargs = dict(class_labels=[0, 3], num_samples=4, seed=5, sampler="ddpm", num_inference_steps=4)
    one = pipe(**kwargs, batch_size=1)
    four = pipe(**kwargs, batch_size=4)
    assert torch.allclose(one.tensors, four.tensors, atol=1e-5)
    shifted = pipe(class_labels=[3], num_samples=1, seed=6, sampler="ddpm", num_inference_steps=4)
    assert torch.allclose(shifted.tensors[0], four.tensors[1], atol=1e-5)  # sample i is seed + i, whatever else is drawn
    raw = ditkit.load(run_dir, device="cpu", use_ema=False)(**kwargs, batch_size=4)
    assert raw.metadata["weights"] == "model" and raw.metadata["checkpoint_sha256"] != four.metadata["checkpoint_sha256"]
    assert not torch.allclose(raw.tensors, four.tensors)


def test_info_prints_config_params_step_and_data(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "step         4" in text and "DiT-T/4, 338,400 parameters" in text and "shapes: 16x16x3, 4 classes" in text
    assert main(["info", str(run_dir / "checkpoints" / "step_0000002"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["step"] == 2 and facts["epoch"] == 0 and facts["config"]["data"]["dataset"] == "shapes"


def test_python_dash_m_entry_point(run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ditkit", "info", str(run_dir), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "DiT-T/4"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--imge-size", "16"], "unknown flag(s): --imge-size (did you mean --image-size?)"),
        ([*TINY, "--image-size", "30"], "--image-size 30 is not divisible by the patch size 4"),
        ([*TINY, "--data", "/no/such/dir"], "'/no/such/dir' is neither a built-in dataset"),
        ([*TINY, "--set", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
        ([*TINY, "--set", "objective.kind=flow"], "learn_sigma=false for flow matching"),
        ([*TINY, "--model", "DiT-Z/2"], "--model 'DiT-Z/2' is not a preset"),
        (["train", "--recipe", "nope"], "unknown recipe 'nope' (--recipe); choose one of: digits"),
        (["sample", "--ckpt", "/no/such/run"], "no such file or folder"),
        ([*TINY, "--set", "sample.sampler=ddim", "--set", "objective.kind=flow", "--set", "objective.learn_sigma=false"],
         "sample.sampler=ddim is for gaussian objectives: use euler or heun"),
    ],
)
def test_bad_input_fails_before_any_work_with_the_fix(argv, message, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--results-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # stopped before creating anything


def test_unconditional_flow_matching_on_an_image_folder(tmp_path, capsys):
    for i in range(12):
        Image.new("RGB", (20, 16), (20 * i, 255 - 20 * i, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    argv = ["train", "--recipe", "shapes_tiny", "--data", str(tmp_path), "--image-size", "8", "--epochs", "2",
            "--global-batch-size", "4", "--results-dir", str(tmp_path / "r"), "--run-name", "flow",
            "--set", "objective.kind=flow", "--set", "objective.learn_sigma=false", "--set", "model.patch_size=2"]
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        assert main(argv) == 0
    assert "checkpoints/step_0000006" in capsys.readouterr().out  # 2 epochs of 12 // 4 steps
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(tmp_path / "r" / "flow"), "--num-samples", "3", "--out-dir", str(out)]) == 0
    with Image.open(out / "000002.png") as im:
        assert im.size == (8, 8) and im.text["sampler"] == "heun" and im.text["label"] == "none (unconditional)"
    assert main(["sample", "--ckpt", str(tmp_path / "r" / "flow"), "--class-labels", "1"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_bad_sampling_requests_name_the_valid_range(run_dir, capsys):
    assert main(["sample", "--ckpt", str(run_dir), "--class-labels", "7"]) == 2
    assert "class label 7 is outside this checkpoint's classes 0..3" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run_dir), "--sampler", "heun"]) == 2
    assert "--sampler heun does not fit a gaussian model" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run_dir), "--cfg-scale", "-1"]) == 2
    assert "--cfg-scale -1.0" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run_dir), "--guide-channels", "7"]) == 2
    assert "the model outputs 6 channels; use 1..6" in capsys.readouterr().err


def test_resume_refuses_changes_to_the_model(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "--model", "DiT-T/2"]) == 2
    assert "cannot change model.name when resuming" in capsys.readouterr().err

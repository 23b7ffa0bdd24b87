"""Sampling precision (issue 21): ``precision="auto"`` samples as training did (fp32 runs and imported
checkpoints stay fp32; image runs trained in auto/bf16 use bf16 where the hardware runs it natively),
"auto" is the pipelines' default, the choice is recorded in the output metadata, and bf16 samples
stay close to fp32 ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ditkit
import ditkit.device
from ditkit.errors import ConfigError
from ditkit.pipelines.base import sampling_dtype

FIXTURES = Path(__file__).parent / "fixtures" / "outputs"
CALL = dict(class_labels=[0, 1, 2, 3], num_samples=4, sampler="ddim", num_inference_steps=4, guidance_scale=2.0, seed=3)


def _run_trained_with(tmp_path: Path, precision: str, recipe: str | None = None) -> Path:
    """The fixture image checkpoint, its config saying training ran at ``precision``."""
    run = tmp_path / f"run-{precision}-{recipe}"
    shutil.copytree(FIXTURES / "image_ckpt", run)
    for path in run.rglob("config.json"):
        cfg = json.loads(path.read_text())
        cfg["train"]["precision"] = precision
        cfg["recipe"] = recipe
        path.write_text(json.dumps(cfg))
    return run


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_training_and_the_hardware(tmp_path, monkeypatch, native):
    monkeypatch.setattr(ditkit.device, "cpu_has_native_bf16", lambda: native)
    expected = "bfloat16" if native else "float32"
    for trained in ("auto", "bf16"):
        pipe = ditkit.load(_run_trained_with(tmp_path, trained), device="cpu", precision="auto")
        assert pipe.dtype == getattr(torch, expected)
        assert pipe(**CALL).metadata["precision"] == expected
    # a run trained in fp32, and an imported checkpoint (no training here to follow), stay fp32
    assert ditkit.load(_run_trained_with(tmp_path, "fp32"), device="cpu", precision="auto").dtype == torch.float32
    imported = _run_trained_with(tmp_path, "auto", recipe="import-dit")
    assert ditkit.load(imported, device="cpu", precision="auto").dtype == torch.float32


def test_explicit_precision_wins_and_unknown_values_are_refused(tmp_path):
    run = _run_trained_with(tmp_path, "fp32")
    assert ditkit.load(run, device="cpu", precision="bf16").dtype == torch.bfloat16
    cfg = ditkit.load(run, device="cpu").cfg
    assert sampling_dtype("fp32", cfg, torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="auto, fp32 or bf16"):
        sampling_dtype("fp16", cfg, torch.device("cpu"))


def test_the_default_is_auto(tmp_path, monkeypatch):
    monkeypatch.setattr(ditkit.device, "cpu_has_native_bf16", lambda: True)
    # the recorded outputs of tests/test_pipelines.py were drawn in fp32 from fp32-trained runs: unchanged
    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    assert pipe.dtype == torch.float32 and pipe(**CALL).metadata["precision"] == "float32"
    # an image run trained in auto samples in bf16 without being asked (measured: docs/fast_sampling.md)
    assert ditkit.load(_run_trained_with(tmp_path, "auto"), device="cpu").dtype == torch.bfloat16
    # text was not measured: it stays fp32 under auto
    text = tmp_path / "text"
    shutil.copytree(FIXTURES / "text_ckpt", text)
    cfg = json.loads((text / "config.json").read_text())
    cfg["train"]["precision"] = "auto"
    (text / "config.json").write_text(json.dumps(cfg))
    assert ditkit.load(text, device="cpu").dtype == torch.float32


def test_bf16_samples_stay_close_to_fp32():
    fp32 = ditkit.load(FIXTURES / "image_ckpt", device="cpu", precision="fp32")(**CALL)
    bf16 = ditkit.load(FIXTURES / "image_ckpt", device="cpu", precision="bf16")(**CALL)
    assert bf16.metadata["precision"] == "bfloat16"
    diff = (bf16.tensors - fp32.tensors).abs()
    assert 0 < diff.max() < 0.25 and diff.mean() < 0.02  # not the same numbers, but the same images

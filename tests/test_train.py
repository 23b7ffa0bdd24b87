"""The training loop: exact resume in a new process (with a control that catches a missing RNG
restore), non-finite loss, Ctrl-C, logs and sample grids."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditkit.train.loop as loop
from ditkit.recipes import get_recipe
from ditkit.train.checkpoint import latest_checkpoint, list_checkpoints, load_training_state

REPO = Path(__file__).resolve().parents[1]


def _tiny(results_dir, run_name, **train):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(results_dir), run_name
    # 40 images, micro-batch 4 (batch 8 in 2 accumulation steps): 10 micro-batches per epoch, so
    # step 3 stops mid-epoch; flips, label dropout, warm-up and cosine decay all in play.
    cfg.data.num_items, cfg.data.hflip = 40, True
    cfg.model.class_dropout_prob = 0.5
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = 8, 2
    cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr_schedule = 7, 2, "cosine"
    cfg.train.log_every, cfg.train.ckpt_every = 2, 100
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _weights(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors")), ckpt


def _resume_in_new_processes(*runs):
    """``ditkit train --resume RUN`` in fresh interpreters, run side by side; ``runs`` holds
    ``(run_dir, skip_rng_restore)`` pairs (the control removes the RNG restore)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO / "src")}
    procs = []
    for run_dir, skip_rng_restore in runs:
        patch = "import ditkit.train.state as S; S.restore_rng_state = lambda *a, **k: None; " if skip_rng_restore else ""
        code = f"{patch}import sys; from ditkit.cli import main; sys.exit(main(['train', '--resume', {str(run_dir)!r}]))"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err


def test_resume_in_a_new_process_is_bitwise_exact_and_the_control_catches_a_missing_rng_restore(tmp_path):
    straight = loop.train(_tiny(tmp_path, "straight"), log=lambda m: None)
    assert straight.step == 7

    stopped = loop.train(_tiny(tmp_path, "resumed"), stop_at_step=3, log=lambda m: None)
    assert stopped.step == 3 and not stopped.interrupted
    state = load_training_state(stopped.checkpoint)
    assert state["data"]["position"] != 0  # the stop falls mid-epoch
    control_dir = tmp_path / "control"
    control_dir.mkdir()
    shutil.copytree(stopped.run_dir, control_dir / "run")

    _resume_in_new_processes((stopped.run_dir, False), (control_dir / "run", True))

    ref_model, ref_ema, ref_ckpt = _weights(straight.run_dir)
    model, ema, ckpt = _weights(stopped.run_dir)
    assert ckpt.name == ref_ckpt.name == "step_0000007"
    for key in ref_model:
        assert torch.equal(model[key], ref_model[key]), key
        assert torch.equal(ema[key], ref_ema[key]), key
    ref_state, state = load_training_state(ref_ckpt), load_training_state(ckpt)
    assert ref_state["data"] == state["data"] and torch.equal(ref_state["rng"]["noise"], state["rng"]["noise"])
    exp_avg = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(exp_avg, ref_state["optimizer"]["state"].values()))

    # Control: the same resume without restoring the RNG state gives different weights.
    control, _, _ = _weights(control_dir / "run")
    assert any(not torch.equal(control[k], ref_model[k]) for k in ref_model)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = loop.training_objective

    class NanAfter:
        def __init__(self, objective, bad_call):
            self.objective, self.calls, self.bad_call = objective, 0, bad_call

        def loss(self, *args, **kwargs):
            self.calls += 1
            out = self.objective.loss(*args, **kwargs)
            return out * float("nan") if self.calls >= self.bad_call else out

    # grad_accum 2: calls 1-2 are step 1, ..., call 9 is the first micro-batch of step 5
    monkeypatch.setattr(loop, "training_objective", lambda cfg, **kw: NanAfter(real_build(cfg, **kw), bad_call=9))
    cfg = _tiny(tmp_path, "nan", ckpt_every=2, log_every=3, max_steps=20)
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite at step 5; the last good checkpoint is .*step_0000004"):
        loop.train(cfg, log=lambda m: None)
    run = tmp_path / "nan"
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    model, _, _ = _weights(run)
    assert all(torch.isfinite(v).all() for v in model.values())


def test_ctrl_c_saves_a_checkpoint_and_returns(tmp_path):
    def press_ctrl_c(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    # the caller's handler (Python's default in a terminal; SIG_IGN in a job started with `&`)
    before = signal.getsignal(signal.SIGINT)
    result = loop.train(_tiny(tmp_path, "int", max_steps=50), on_step=press_ctrl_c, log=lambda m: None)
    assert result.interrupted and result.step == 3
    assert result.checkpoint.name == "step_0000003" and load_training_state(result.checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_metrics_sample_grids_and_resume_trims_the_log(tmp_path):
    cfg = _tiny(tmp_path, "logs", sample_every=3, max_steps=6, log_every=1)
    cfg.sample.num_samples = 4
    first = loop.train(cfg, stop_at_step=4, log=lambda m: None)
    lines = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "steps_per_sec", "epoch"} <= set(lines[0])
    assert lines[0]["lr"] == pytest.approx(cfg.train.lr / 2)  # warm-up step 1 of 2
    assert (first.run_dir / "samples" / "step_0000003.png").is_file()
    # pretend the process ran on to step 5 after the checkpoint, then crashed: resume drops that line
    with open(first.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")
    loop.train(cfg, resume=first.run_dir, log=lambda m: None)
    steps = [json.loads(x)["step"] for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (first.run_dir / "samples" / "step_0000006.png").is_file()
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert saved["data"]["channels"] == 3 and saved["data"]["num_classes"] == 4  # resolved from the data


def test_a_new_run_never_overwrites_checkpoints(tmp_path):
    cfg = _tiny(tmp_path, "once", max_steps=1)
    loop.train(cfg, log=lambda m: None)
    with pytest.raises(loop.ConfigError, match="already holds checkpoints: continue it with --resume"):
        loop.train(cfg, log=lambda m: None)
    cfg.run.run_name = None  # automatic names count up
    assert loop.new_run_dir(cfg).name.startswith("000-DiT-T-4-shapes")


@pytest.mark.slow  # CPU torch.compile
@pytest.mark.timeout(900)
def test_compiled_training_matches_eager_and_reports_the_compile_time(tmp_path):
    """train.compile=true (what "auto" turns on for long CUDA runs) through the real loop: the same
    losses and weights as eager within float32 tolerance, and the first step's time in the log."""
    results = {}
    for mode in (False, True):
        lines = []
        cfg = _tiny(tmp_path, f"compile-{mode}", compile=mode, max_steps=3, log_every=1, precision="fp32")
        cfg.model.class_dropout_prob = 0.0  # no dropout draws beside the loss: identical randomness
        result = loop.train(cfg, log=lines.append)
        losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        results[mode] = (losses, _weights(result.run_dir)[0], lines)
    (eager_losses, eager_w, eager_log), (comp_losses, comp_w, comp_log) = results[False], results[True]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    for key in eager_w:
        torch.testing.assert_close(comp_w[key], eager_w[key], rtol=1e-3, atol=1e-5)
    assert any("torch.compile: first step" in line for line in comp_log)
    assert not any("torch.compile" in line for line in eager_log)

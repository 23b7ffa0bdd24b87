"""Checkpoints: format, weights_only loading, atomic saves under injected failures, pruning; EMA."""

import os

import pytest
import torch
from torch import nn

import ditkit.train.checkpoint as ckpt_mod
from ditkit.config import Config
from ditkit.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_config,
    load_training_state,
    load_weights,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from ditkit.train.ema import EMA


def _save(run, step, value=0.0):
    weights = {"w": torch.full((3, 2), float(value)), "b": torch.arange(3.0)}
    ema = {k: v + 1 for k, v in weights.items()}
    state = {
        "step": step, "epoch": 1, "rng": {"cpu": torch.get_rng_state()},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99)}]},
    }
    cfg = Config()
    cfg.train.max_steps = step
    return save_checkpoint(run, step, weights, ema, cfg, state)


def test_round_trip_and_weights_only_state(tmp_path):
    path = _save(tmp_path, 5, value=2.5)
    assert path == tmp_path / "checkpoints" / "step_0000005"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors", "state.pt"]
    assert torch.equal(load_weights(path, "model")["w"], torch.full((3, 2), 2.5))
    assert torch.equal(load_weights(path, "ema")["w"], torch.full((3, 2), 3.5))
    state = torch.load(path / "state.pt", weights_only=True)  # the promise: no pickle of arbitrary objects
    assert state["step"] == 5 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert load_training_state(path)["rng"]["cpu"].dtype == torch.uint8
    assert load_checkpoint_config(path).train.max_steps == 5
    assert resolve_checkpoint(tmp_path) == path  # run dir -> newest checkpoint
    assert resolve_checkpoint(tmp_path / "checkpoints") == path


def test_failure_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 1, value=1.0)
    real_write = ckpt_mod._write_file
    calls = []

    def failing_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # model.safetensors written, crash while writing ema.safetensors
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # half a file, as a crash would leave
            raise OSError("disk full (injected)")
        real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", failing_write)
    with pytest.raises(OSError, match="injected"):
        _save(tmp_path, 2, value=2.0)
    monkeypatch.setattr(ckpt_mod, "_write_file", real_write)
    assert latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "checkpoints" / "step_0000002").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]  # no temp left behind
    assert torch.equal(load_weights(resolve_checkpoint(tmp_path), "model")["w"], torch.full((3, 2), 1.0))
    assert load_training_state(good)["step"] == 1


def test_failure_while_replacing_a_step_keeps_the_old_one(tmp_path, monkeypatch):
    first = _save(tmp_path, 3, value=1.0)
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):  # the old copy is already moved aside when publishing fails
            raise OSError("power cut (injected)")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        _save(tmp_path, 3, value=9.0)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert torch.equal(load_weights(first, "model")["w"], torch.full((3, 2), 1.0))
    # A hard crash between the two renames (no exception handler runs) leaves the old copy under
    # .old-*: readers still find that step.
    os.rename(first, first.parent / ".old-step_0000003-123")
    found = latest_checkpoint(tmp_path)
    assert found.name == ".old-step_0000003-123" and load_training_state(found)["step"] == 3
    _save(tmp_path, 4)
    prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000004"]


def test_keep_last_and_stale_temp_dirs(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    stale = tmp_path / "checkpoints" / ".tmp-step_0000009-999999"
    stale.mkdir()
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert not stale.exists()


def test_missing_checkpoints_say_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        resolve_checkpoint(tmp_path)


def test_ema_warmup_and_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)  # frozen: copied, not averaged
    ema = EMA(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].weight.fill_(5.0)
    ema.update(model)
    expected = before + (1 - 0.1) * (model[0].weight - before)
    assert torch.allclose(ema.model[0].weight, expected)
    assert torch.equal(ema.model[1].weight, model[1].weight)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999
    assert not any(p.requires_grad for p in ema.model.parameters())

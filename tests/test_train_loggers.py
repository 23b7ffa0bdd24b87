"""Optional loggers: TensorBoard event files and Weights & Biases in offline mode (no network)."""

import pytest

from ditkit.recipes import get_recipe
from ditkit.train.loop import train


def _cfg(tmp_path, **run):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir = str(tmp_path)
    cfg.run.run_name = "logged"
    cfg.train.max_steps = 4
    cfg.train.log_every = 2
    for key, value in run.items():
        setattr(cfg.run, key, value)
    return cfg


def test_tensorboard_event_file_holds_the_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_cfg(tmp_path, tensorboard=True), log=lambda _: None)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4]
    assert all(e.value > 0 for e in losses)


def test_wandb_offline_run_is_written_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(_cfg(tmp_path, tensorboard=False, wandb=True, wandb_mode="offline"), log=lambda _: None)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))

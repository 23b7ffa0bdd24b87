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


def test_tensorboard_gets_the_sample_grid(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, tensorboard=True)
    cfg.train.sample_every = 4
    result = train(cfg, log=lambda _: None)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    grids = events.Images("samples/grid")
    assert [e.step for e in grids] == [4]
    from PIL import Image

    with Image.open(result.run_dir / "samples" / "step_0000004.png") as im:
        assert (grids[0].width, grids[0].height) == im.size  # the grid written to disk, whole


def test_tensorboard_gets_audio_clips(tmp_path):
    """Audio runs: the spectrogram strip as an image and the training WAVs as audio (issue 18)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_audio_pipeline import SR, tiny_cfg, write_tones

    cfg = tiny_cfg(tmp_path, write_tones(tmp_path / "tones"), "tb", sample_every=5)
    cfg.run.tensorboard = True
    result = train(cfg, log=lambda _: None)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["audio"]) == ["samples/0", "samples/1", "samples/2"]  # sample.num_samples=3, up to 4 WAVs
    clip = events.Audio("samples/0")[0]
    assert clip.step == 5 and clip.sample_rate == SR and clip.length_frames == SR  # 1 s clips
    assert "samples/grid" in tags["images"]

"""train.time_budget and the warmup-stable-decay schedule (issue 16).

No test measures wall-clock time: the loop reads its training seconds from an injected ``clock``;
here a clock that advances 10 s each time it is read (the loop reads it once when it starts and
once per step, with no sample grids or evaluation), so step ``s`` (0-based) starts at ``10 s``.
"""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from ditkit.config import Config, ConfigError
from ditkit.recipes import get_recipe
from ditkit.train.checkpoint import list_checkpoints, load_training_state
from ditkit.train.hooks import duration_flag, parse_duration
from ditkit.train.loop import lr_at, preflight, train

LR = 1e-3


def ticking_clock(seconds_per_read: float = 10.0):
    ticks = itertools.count(0.0, seconds_per_read)
    return lambda: next(ticks)


def _cfg(tmp_path, name, **train_kw):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), name
    cfg.run.tensorboard = False
    cfg.data.num_items = 40
    cfg.train.global_batch_size, cfg.train.precision = 8, "fp32"
    cfg.train.max_steps, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.sample_every = 1000, 1, 1000, 0
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_schedule = LR, 0, "wsd"
    cfg.train.time_budget, cfg.train.decay_fraction, cfg.train.min_lr_ratio = "100s", 0.2, 0.0
    for key, value in train_kw.items():
        setattr(cfg.train, key, value)
    return cfg


def _logged_lrs(run_dir):
    return [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45), (" 2M ", 120)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds", [16, 90, 1200, 5400, 9000])
def test_suggested_durations_read_back(seconds):
    assert parse_duration(duration_flag(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["ten minutes", "-5m", "0s", "5d", "", "1h30m"])
def test_bad_durations_are_one_line_config_errors(text):
    with pytest.raises(ConfigError, match=r"--time-budget .*: give a positive duration such as 90s, 10m or 1.5h") as err:
        parse_duration(text)
    assert "\n" not in str(err.value)
    cfg = get_recipe("shapes_tiny")
    cfg.train.time_budget = text
    with pytest.raises(ConfigError, match="give a positive duration"):
        preflight(cfg)  # before any data is loaded


def test_wsd_by_steps_warms_up_holds_then_decays_linearly_over_the_last_fraction():
    t = Config().train
    t.lr, t.warmup_steps, t.lr_schedule, t.decay_fraction, t.min_lr_ratio = 1.0, 2, "wsd", 0.5, 0.1
    lrs = [lr_at(s, t, 10) for s in range(10)]
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # warm-up
    assert lrs[2:6] == pytest.approx([1.0] * 4)  # stable until half of the run (step 5 starts the decay)
    # decay: 1 - 0.9 * (s - 5) / 5, reaching 0.1 at the end of the run (step 10)
    assert lrs[6:] == pytest.approx([0.82, 0.64, 0.46, 0.28])
    assert lr_at(10, t, 10) == pytest.approx(0.1)


def test_wsd_over_a_time_budget_needs_no_step_count():
    t = Config().train
    t.lr, t.warmup_steps, t.lr_schedule, t.decay_fraction, t.min_lr_ratio = 1.0, 3, "wsd", 0.2, 0.0
    at = lambda step, elapsed: lr_at(step, t, None, elapsed_s=elapsed, budget_s=600.0)  # noqa: E731
    assert at(0, 0.0) == pytest.approx(1 / 3)  # warm-up is counted in steps
    assert at(50, 100.0) == at(5000, 480.0) == 1.0  # stable until 80% of the budget, whatever the step
    assert at(50, 540.0) == pytest.approx(0.5) and at(50, 600.0) == 0.0 and at(50, 900.0) == 0.0
    t.lr_schedule = "cosine"  # cosine follows the budget too
    assert at(50, 300.0) == pytest.approx(0.5)


def test_the_budget_stops_the_run_with_a_checkpoint_and_the_schedule_decays_over_its_end(tmp_path):
    lines = []
    result = train(_cfg(tmp_path, "budget"), log=lines.append, clock=ticking_clock())
    # steps start at 0, 10, ..., 90 s of training: the 10th step ends at 100 s = the budget
    assert result.step == 10 and result.stop_reason == "budget" and result.train_s == 100.0
    assert result.checkpoint.name == "step_0000010" and [c.name for c in list_checkpoints(result.run_dir)] == ["step_0000010"]
    assert load_training_state(result.checkpoint)["elapsed_s"] == 100.0
    # stable until 80 s, then linear to 0 at 100 s: steps starting at 80 s and 90 s
    assert _logged_lrs(result.run_dir) == pytest.approx([LR] * 9 + [LR * 0.5])
    assert any("time budget 100s spent: 10 steps fitted (10 in this session" in line for line in lines), lines


def test_a_resumed_budget_run_continues_the_same_budget_bitwise(tmp_path):
    straight = train(_cfg(tmp_path, "straight"), log=lambda m: None, clock=ticking_clock())
    first = train(_cfg(tmp_path, "resumed"), stop_at_step=4, log=lambda m: None, clock=ticking_clock())
    assert first.step == 4 and first.stop_reason == "stop_at_step" and first.train_s == 40.0
    lines = []
    second = train(_cfg(tmp_path, "resumed"), resume=first.run_dir, log=lines.append, clock=ticking_clock())
    assert second.step == 10 and second.stop_reason == "budget" and second.steps_this_session == 6
    assert _logged_lrs(second.run_dir) == pytest.approx(_logged_lrs(straight.run_dir))
    a = load_file(str(straight.checkpoint / "model.safetensors"))
    b = load_file(str(second.checkpoint / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("10 steps fitted (6 in this session" in line for line in lines)

    # a third session has nothing left: it says so and how to extend the budget
    lines.clear()
    again = train(_cfg(tmp_path, "resumed"), resume=second.run_dir, log=lines.append, clock=ticking_clock())
    assert again.stop_reason == "finished" and again.step == 10
    assert any("already finished: its time budget of 100s is spent" in line and "--time-budget 200s" in line for line in lines)
    assert [c.name for c in list_checkpoints(second.run_dir)] == ["step_0000004", "step_0000010"]


def test_a_longer_budget_on_resume_extends_the_run(tmp_path):
    first = train(_cfg(tmp_path, "extend"), log=lambda m: None, clock=ticking_clock())
    assert first.step == 10
    more = train(_cfg(tmp_path, "extend", time_budget="150s"), resume=first.run_dir, log=lambda m: None, clock=ticking_clock())
    assert more.step == 15 and more.stop_reason == "budget" and more.train_s == 150.0

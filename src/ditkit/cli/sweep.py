"""``ditkit sweep``: hyperparameter search with Optuna over any config key (``ditkit.sweep``).

    ditkit sweep --recipe digits --space sweep.toml --trials 40 --budget-per-trial 120s --metric fd
    ditkit sweep --recipe digits --space sweep.toml --trials 40 --budget-per-trial 120s --resume   # continue / join
    ditkit sweep --ckpt results/digits --space sample.toml --trials 20 --metric fd                 # sampling only

The study, one run directory per trial and the report (report.md, trials.csv, best_config.json,
plots/) go to ``--study-dir`` (default ``sweeps/<space file name>``). docs/sweep.md has the space
file format, pruning, several workers and the dashboard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_sweep"]


@COMMANDS.register("sweep", order=50, summary="hyperparameter search with Optuna: pruned, resumable, with a report")
def register(subparsers: Any) -> None:
    sw = subparsers.add_parser(
        "sweep", help="hyperparameter search with Optuna: pruned, resumable, with a report",
        description="Search a space of config values (a TOML/JSON file) with Optuna: each trial a ditkit run, "
                    "or (--ckpt) sampling options of a finished run.",
    )
    sw.add_argument("--space", required=True, metavar="FILE", help="search space (.toml or .json), see docs/sweep.md")
    start = sw.add_mutually_exclusive_group()
    start.add_argument("--recipe", help="train trials from this recipe (default: digits)")
    start.add_argument("--config", help="train trials from this config.json")
    start.add_argument("--ckpt", metavar="RUN_OR_CKPT", help="search sampling options of this finished run (no training)")
    sw.add_argument("--trials", type=int, default=20, help="finished (complete or pruned) trials to reach (default 20)")
    sw.add_argument("--metric", default="fd", help="fd (default), accuracy, precision, recall; text: bpc")
    sw.add_argument("--budget-per-trial", metavar="DURATION", help="training time of each trial (90s, 2m): train.time_budget")
    sw.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations reported to the pruner")
    sw.add_argument("--eval-samples", type=int, metavar="N", help="samples per evaluation (train.eval_samples)")
    sw.add_argument("--study-dir", metavar="DIR", help="where the study, the trial runs and the report go")
    sw.add_argument("--study-name", help="name of the study in the storage (default: the study dir's name)")
    sw.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="Optuna sampler (default tpe)")
    sw.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median", help="default median")
    sw.add_argument("--startup-trials", type=int, metavar="N", help="trials before TPE models and the pruner prunes "
                                                                  "(default: a quarter of --trials, 2 to 10)")
    sw.add_argument("--include-base", action="store_true",
                    help="first trial: the recipe's / config's (--ckpt: the checkpoint's) own values, to compare with")
    sw.add_argument("--resume", action="store_true", help="continue the study in --study-dir (or join it as one more worker)")
    sw.add_argument("--storage", metavar="URL", help="a database URL instead of STUDY_DIR/study.db "
                                                    "(postgresql://user:pass@host/db for workers on several machines)")
    sw.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler (default 0)")
    sw.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="fix a config value for every trial")
    sample = sw.add_argument_group("sampling-only sweeps (--ckpt)")
    sample.add_argument("--num-samples", type=int, default=500, help="samples per trial (default 500)")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--batch-size", type=int, default=250)
    sw.set_defaults(func=cmd_sweep, interrupted_message="interrupted: continue with the same command and --resume")


def cmd_sweep(args: argparse.Namespace) -> int:
    from ditkit.config import ConfigError, apply_overrides, load_config, parse_set_option
    from ditkit.sweep import load_space, run_sampling_sweep, run_training_sweep, sweep_base_config, write_report

    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: must be at least 1")
    params = load_space(args.space)
    study_dir = Path(args.study_dir) if args.study_dir else Path("sweeps") / Path(args.space).stem
    common = dict(trials=args.trials, metric=args.metric, sampler=args.sampler, resume=args.resume, storage=args.storage,
                  seed=args.seed, startup_trials=args.startup_trials, study_name=args.study_name, source=args.space, log=_log)
    if args.ckpt is not None:
        for flag, value in (("--budget-per-trial", args.budget_per_trial), ("--eval-every", args.eval_every),
                            ("--eval-samples", args.eval_samples), ("--set", args.set or None)):
            if value is not None:
                raise ConfigError(f"{flag} is for training sweeps: a --ckpt sweep only samples (use --num-samples)")
        if args.pruner != "median":
            raise ConfigError("--pruner is for training sweeps: a --ckpt trial is one evaluation, nothing to prune")
        study = run_sampling_sweep(args.ckpt, params, study_dir, num_samples=args.num_samples, device=args.device,
                                   batch_size=args.batch_size, include_base=args.include_base, **common)
    else:
        from ditkit.recipes import get_recipe

        cfg = load_config(args.config) if args.config else get_recipe(args.recipe or "digits")
        cfg = apply_overrides(cfg, dict(parse_set_option(item) for item in args.set))
        if args.budget_per_trial is not None:
            from ditkit.train.hooks import parse_duration

            parse_duration(args.budget_per_trial, "--budget-per-trial")
        cfg = sweep_base_config(cfg, budget=args.budget_per_trial, eval_every=args.eval_every,
                                eval_samples=args.eval_samples, log=_log)
        study = run_training_sweep(cfg, params, study_dir, pruner=args.pruner, include_base=args.include_base, **common)
    written = write_report(study, study_dir, log=_log)
    try:
        best = study.best_trial
        print(f"best: trial {best.number}, {args.metric} {best.value:.4g}: "
              + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    except ValueError:
        print("no trial completed yet")
    print(f"report: {written['report.md']}")
    if "best_config.json" in written:
        print(f"train it: ditkit train --config {written['best_config.json']}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

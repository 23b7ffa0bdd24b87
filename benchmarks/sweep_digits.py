"""Does a short Optuna sweep beat the digits recipe at the same training budget? (issue 22)

    OMP_NUM_THREADS=1 python benchmarks/sweep_digits.py                      # 8 trials x 60 s (what docs/sweep.md reports)
    OMP_NUM_THREADS=1 python benchmarks/sweep_digits.py --trials 20 --budget 120s   # the issue's 40-minute version

The space: learning rate, EMA decay and warm-up, prediction target and noise schedule of the digits
recipe (``SPACE``). Trial 0 is the recipe's own values (``include_base``), so the search is compared
with it inside one study: same budget, same evaluation (FD on classifier features of
``--eval-samples`` EMA samples with the recipe's sampler, DDPM-50 at guidance 1.25), median pruning.
Afterwards the final checkpoints of the recipe trial and of the best trial are scored again with
``--final-samples`` samples at ``--final-seeds`` sampling seeds (``evaluate_generator``), so the
verdict does not rest on the 200-sample number the search optimised. Training noise (one training
seed per config) is not averaged out: see the caveat printed at the end.

Writes STUDY_DIR (default benchmarks/results/sweep_digits): the study and report of ``ditkit sweep``,
and ``comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SPACE = """\
train.lr = {log_uniform = [2e-4, 4e-3]}
train.ema_decay = [0.99, 0.995, 0.999]
train.ema_warmup = [true, false]
objective.prediction = ["eps", "v"]
objective.schedule = ["linear", "cosine"]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--budget", default="60s", help="training time per trial (train.time_budget)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--final-samples", type=int, default=1000)
    parser.add_argument("--final-seeds", type=int, default=2)
    parser.add_argument("--study-dir", default="benchmarks/results/sweep_digits")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.pipelines.image import ImagePipeline
    from ditkit.recipes import get_recipe
    from ditkit.sweep import parse_space, run_training_sweep, sweep_base_config, write_report

    import tomllib

    study_dir = Path(args.study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "space.toml").write_text(SPACE)
    base = get_recipe("digits")
    base.train.sample_every, base.run.tensorboard = 0, False  # grids are not scored; keep the budget for training
    base = sweep_base_config(base, budget=args.budget, eval_every=args.eval_every, eval_samples=args.eval_samples)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    study = run_training_sweep(base, parse_space(tomllib.loads(SPACE), str(study_dir / "space.toml")), study_dir,
                               trials=args.trials, metric="fd", sampler="tpe", pruner="median", resume=args.resume,
                               include_base=True, source=str(study_dir / "space.toml"), log=log)
    sweep_s = time.time() - t0
    write_report(study, study_dir, log=log)

    recipe_trial = next(t for t in study.trials if t.user_attrs.get("base"))
    best = study.best_trial
    rows = {}
    for name, trial in (("recipe", recipe_trial), ("best", best)):
        if name in rows or trial.state.name != "COMPLETE":
            continue
        pipe = ImagePipeline.from_checkpoint(trial.user_attrs["run_dir"], device="cpu", precision="fp32")
        evaluator = build_evaluator(pipe.cfg)
        fds, accs = [], []
        for seed in range(args.final_seeds):
            metrics = evaluate_generator(pipe, evaluator, args.final_samples, seed=1000 + seed * args.final_samples)["metrics"]
            fds.append(metrics["fd_classifier"])
            accs.append(metrics["conditional_accuracy"])
        rows[name] = {"trial": trial.number, "params": trial.params, "sweep_value": trial.value,
                      "steps": trial.user_attrs.get("steps"), "train_s": trial.user_attrs.get("train_s"),
                      "fd_classifier": fds, "fd_median": statistics.median(fds), "conditional_accuracy": accs}
        log(f"{name}: trial {trial.number} {trial.params}: FD {fds} accuracy {accs}")
        if best.number == recipe_trial.number:
            rows["best"] = rows["recipe"]
            break
    result = {
        "command": " ".join(["OMP_NUM_THREADS=1", "python", *sys.argv]),
        "trials": args.trials, "budget": args.budget, "eval_every": args.eval_every, "eval_samples": args.eval_samples,
        "final_samples": args.final_samples, "final_seeds": args.final_seeds, "sweep_seconds": round(sweep_s),
        "torch_threads": torch.get_num_threads(),
        "states": {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
        **rows,
    }
    (study_dir / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if best.number == recipe_trial.number:
        print(f"no config of the space beat the recipe at {args.budget}: the recipe's own trial was the best "
              f"(FD {rows['recipe']['fd_median']:.2f}, {args.final_samples} samples, median of {args.final_seeds} sampling seeds)")
    elif "best" in rows and "recipe" in rows:
        verdict = "beats" if rows["best"]["fd_median"] < rows["recipe"]["fd_median"] else "does not beat"
        print(f"the best found config {verdict} the recipe at {args.budget}: FD {rows['best']['fd_median']:.2f} vs "
              f"{rows['recipe']['fd_median']:.2f} ({args.final_samples} samples, median of {args.final_seeds} sampling seeds; "
              "one training seed each, so differences within the training noise are not findings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

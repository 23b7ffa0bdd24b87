"""Does the sweep's best config also beat the recipe at the recipe's own length? (issue 22: "fold the
finding back into the recipe if it does")

    OMP_NUM_THREADS=1 python benchmarks/sweep_foldback.py --study-dir benchmarks/results/sweep_digits_40min \
        --recipe-run /work/runs/digits

``benchmarks/sweep_digits.py`` compares configs at a short time budget per trial. A config that wins
there may only be faster off the mark. This trains the recipe with the best trial's values
(``STUDY_DIR/comparison.json``) for the recipe's full ``max_steps``, keeping a checkpoint every
``--every`` steps, and scores those checkpoints and the same steps of a run of the recipe itself
(``--recipe-run``: a finished ``ditkit train --recipe digits`` run; trained here when not given) with
the same protocol: FD on classifier features and conditional accuracy of ``--samples`` EMA samples
at ``--seeds`` sampling seeds, the recipe's sampler (DDPM-50, guidance 1.25). Writes
``STUDY_DIR/foldback.json`` and prints the table docs/sweep.md shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def score(run_dir: Path, steps: list[int], samples: int, seeds: int) -> dict[int, dict]:
    """FD and accuracy (median over sampling seeds) of each checkpoint ``step_N`` of ``run_dir``."""
    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.pipelines.image import ImagePipeline

    rows = {}
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
        if not ckpt.is_dir():
            continue
        pipe = ImagePipeline.from_checkpoint(ckpt, device="cpu", precision="fp32")
        evaluator = build_evaluator(pipe.cfg)
        fds, accs = [], []
        for seed in range(seeds):
            metrics = evaluate_generator(pipe, evaluator, samples, seed=1000 + seed * samples)["metrics"]
            fds.append(metrics["fd_classifier"])
            accs.append(metrics["conditional_accuracy"])
        rows[step] = {"fd": fds, "fd_median": statistics.median(fds), "accuracy": accs,
                      "accuracy_median": statistics.median(accs)}
        print(f"{run_dir.name} step {step}: FD {fds} accuracy {accs}", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study-dir", default="benchmarks/results/sweep_digits_40min")
    parser.add_argument("--recipe", default="digits")
    parser.add_argument("--recipe-run", help="a finished run of the recipe (default: train one here)")
    parser.add_argument("--every", type=int, default=1000, help="checkpoint and score every N steps")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()

    from ditkit.config import apply_overrides
    from ditkit.recipes import get_recipe
    from ditkit.train.loop import train

    study_dir = Path(args.study_dir)
    best = json.loads((study_dir / "comparison.json").read_text())["best"]
    runs: dict[str, Path] = {}
    t0 = time.time()
    for name, params in (("best", best["params"]), ("recipe", None)):
        if name == "recipe" and args.recipe_run:
            runs[name] = Path(args.recipe_run)
            continue
        cfg = get_recipe(args.recipe)
        if params:
            cfg = apply_overrides(cfg, params)
        cfg.train.ckpt_every, cfg.train.keep_last, cfg.train.sample_every = args.every, 100, 0
        cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(study_dir / "foldback"), name, False
        done = study_dir / "foldback" / name / "checkpoints" / f"step_{cfg.train.max_steps:07d}"
        if not done.is_dir():  # resumable: a finished run is kept
            resume = done.parent.parent if done.parent.is_dir() else None
            train(cfg, resume=resume, log=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
        runs[name] = study_dir / "foldback" / name
    train_s = time.time() - t0
    max_steps = get_recipe(args.recipe).train.max_steps
    steps = list(range(args.every, max_steps + 1, args.every))
    table = {name: score(run, steps, args.samples, args.seeds) for name, run in runs.items()}
    result = {"best_params": best["params"], "recipe_run": str(runs["recipe"]), "samples": args.samples,
              "seeds": args.seeds, "train_seconds": round(train_s), "scores": table}
    (study_dir / "foldback.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| step | recipe FD | recipe accuracy | best config FD | best config accuracy |", "| --- | --- | --- | --- | --- |"]
    for step in steps:
        r, b = table["recipe"].get(step), table["best"].get(step)
        cell = lambda row, key: "-" if row is None else f"{row[key]:.3g}"  # noqa: E731
        lines.append(f"| {step} | {cell(r, 'fd_median')} | {cell(r, 'accuracy_median')} | {cell(b, 'fd_median')} | "
                     f"{cell(b, 'accuracy_median')} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

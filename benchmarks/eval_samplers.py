"""Sample quality by sampler, number of steps, timestep spacing and guidance scale.

For a Gaussian (eps) model trained with ``ditkit train --recipe digits`` and a flow model trained
with the same recipe and ``--set objective.kind=flow``, draw ``--num-samples`` class-conditional
samples (labels cycling over the 10 classes, sample i seeded ``seed + i``) per setting and score
them with ``ditkit.eval`` against the training digits: FD in ditkit's classifier features, improved
precision / recall (k = 3) and conditional accuracy. Also scores ``--num-samples`` real training
images (the floor the metrics can reach with this many samples) and one setting again with other
seeds (the seed-to-seed spread).

    python benchmarks/eval_samplers.py --ckpt results/digits --flow-ckpt results/digits_flow \\
        --num-samples 500 --precision bf16 --out benchmarks/results/eval_samplers.json

Order: the guidance sweep runs first (with ``--sweep-sampler``), the sampler table then uses the
scale with the lowest FD (or ``--table-cfg``), and the table's best setting gets its own sweep. Results are written to ``--out`` after every
setting, so a stopped run keeps what it measured; ``--resume`` skips settings already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

from ditkit.eval.model_eval import build_evaluator, eval_labels, evaluate_generator, reference_dataset  # noqa: E402
from ditkit.sampling import ImageGenerator  # noqa: E402

GAUSSIAN_TABLE = [  # (sampler, steps, spacing)
    ("ddpm", 250, "uniform"),
    ("ddpm", 100, "uniform"),
    ("ddim", 50, "uniform"),
    ("ddim", 50, "quadratic"),
    ("ddim", 25, "uniform"),
    ("ddim", 25, "quadratic"),
    ("dpm++", 25, "uniform"),
    ("dpm++", 25, "quadratic"),
    ("dpm++", 10, "uniform"),
    ("dpm++", 10, "quadratic"),
]
FLOW_TABLE = [("euler", 50), ("euler", 20), ("euler", 10), ("heun", 50), ("heun", 20), ("heun", 10)]
COLUMNS = ["model", "sampler", "steps", "spacing", "cfg", "seed", "FD", "precision", "recall", "accuracy", "seconds"]


def row_of(results: dict, model: str) -> dict:
    s, m = results["sampling"], results["metrics"]
    return {
        "model": model, "sampler": s.get("sampler", "-"), "steps": s.get("num_sampling_steps", "-"),
        "spacing": s.get("timestep_spacing", "-"), "cfg": s.get("cfg_scale", "-"), "seed": s.get("seed", "-"),
        "FD": m["fd_classifier"], "precision": m["precision"], "recall": m["recall"],
        "accuracy": m.get("conditional_accuracy", float("nan")), "seconds": s.get("sampling_seconds", 0.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="results/digits", help="gaussian run (ditkit train --recipe digits)")
    p.add_argument("--flow-ckpt", default="results/digits_flow", help="flow run (--set objective.kind=flow); '' to skip")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    p.add_argument("--sweep-sampler", default="dpm++:25:quadratic", help="sampler:steps:spacing of the guidance sweep")
    p.add_argument("--table-cfg", type=float, help="guidance of the sampler tables (default: best FD of the sweep)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--only", choices=["all", "gaussian", "flow"], default="all")
    p.add_argument("--out", default="benchmarks/results/eval_samplers.json")
    p.add_argument("--resume", action="store_true", help="keep the settings already in --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    record = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    record.update({"machine": machine(), "num_samples": args.num_samples, "precision": args.precision,
                   "command": " ".join(sys.argv)})
    record.setdefault("rows", [])

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")

    def done(model: str, sampler: str, steps: int, spacing: str, cfg: float, seed: int) -> dict | None:
        for r in record["rows"]:
            if (r["model"], r["sampler"], r["steps"], r["spacing"], r["cfg"], r["seed"]) == (model, sampler, steps, spacing, cfg, seed):
                return r
        return None

    def run(gen: ImageGenerator, evaluator, model: str, sampler: str, steps: int, spacing: str, cfg: float, seed: int) -> dict:
        have = done(model, sampler, steps, spacing, cfg, seed)
        if have is not None:
            return have
        t0 = time.time()
        results = evaluate_generator(
            gen, evaluator, args.num_samples, sampler=sampler, num_sampling_steps=steps, cfg_scale=cfg,
            timestep_spacing=None if spacing == "-" else spacing, seed=seed, batch_size=args.batch_size,
        )
        row = row_of(results, model)
        row["spacing"] = spacing
        record["rows"].append(row)
        record.setdefault("feature_extractor", results["feature_extractor"])
        record.setdefault("checkpoints", {})[model] = {
            "path": results["sampling"]["checkpoint"], "sha256": results["sampling"]["checkpoint_sha256"],
            "step": results["sampling"]["step"],
        }
        save()
        print(f"{model} {sampler} {steps} {spacing} cfg {cfg:g} seed {seed}: FD {row['FD']:.3f} P {row['precision']:.3f} "
              f"R {row['recall']:.3f} acc {row['accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True)
        return row

    gen = ImageGenerator.from_checkpoint(args.ckpt, device="cpu", precision=args.precision)
    dataset = reference_dataset(gen.cfg)
    evaluator = build_evaluator(gen.cfg, dataset, verbose=True)
    info = evaluator.classifier.info
    record["classifier_holdout_accuracy"] = info.get("holdout_accuracy")

    # the floor: real training images, as many as the samples, labels cycling like the samples'
    if not any(r["model"] == "real data" for r in record["rows"]):
        wanted = torch.as_tensor(eval_labels(gen.cfg, args.num_samples))
        picks = torch.cat([
            torch.nonzero(dataset.labels == c).flatten()[: int((wanted == c).sum())] for c in range(dataset.num_classes)
        ])
        real = evaluator.evaluate(dataset.images[picks], dataset.labels[picks], {"samples": "real training images"})
        record["rows"].append({"model": "real data", "sampler": "-", "steps": "-", "spacing": "-", "cfg": "-", "seed": "-",
                               "FD": real["metrics"]["fd_classifier"], "precision": real["metrics"]["precision"],
                               "recall": real["metrics"]["recall"], "accuracy": real["metrics"]["conditional_accuracy"],
                               "seconds": 0.0})
        save()

    if args.only in ("all", "gaussian"):
        sweep_sampler, sweep_steps, sweep_spacing = args.sweep_sampler.split(":")
        sweep = [run(gen, evaluator, "gaussian", sweep_sampler, int(sweep_steps), sweep_spacing, c, args.seed) for c in args.cfg_scales]
        table_cfg = args.table_cfg if args.table_cfg is not None else min(sweep, key=lambda r: r["FD"])["cfg"]
        record["table_cfg"] = table_cfg
        for sampler, steps, spacing in GAUSSIAN_TABLE:
            run(gen, evaluator, "gaussian", sampler, steps, spacing, table_cfg, args.seed)
        run(gen, evaluator, "gaussian", sweep_sampler, int(sweep_steps), sweep_spacing, table_cfg, args.seed + 100_000)
        # the best setting of the table gets its own guidance sweep (its best scale may differ)
        table = [r for r in record["rows"] if r["model"] == "gaussian" and r["cfg"] == table_cfg and r["seed"] == args.seed]
        best = min(table, key=lambda r: r["FD"])
        record["best_gaussian"] = {k: best[k] for k in ("sampler", "steps", "spacing")}
        for c in args.cfg_scales:
            run(gen, evaluator, "gaussian", best["sampler"], best["steps"], best["spacing"], c, args.seed)
    if args.only in ("all", "flow") and args.flow_ckpt:
        flow = ImageGenerator.from_checkpoint(args.flow_ckpt, device="cpu", precision=args.precision)
        table_cfg = args.table_cfg if args.table_cfg is not None else record.get("table_cfg", 4.0)
        for sampler, steps in FLOW_TABLE:
            run(flow, evaluator, "flow", sampler, steps, "-", table_cfg, args.seed)
        for c in args.cfg_scales:
            run(flow, evaluator, "flow", "heun", 20, "-", c, args.seed)
    print_table(record["rows"], COLUMNS)


if __name__ == "__main__":
    main()

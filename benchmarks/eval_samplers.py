"""Sample quality by sampler, number of steps, timestep spacing and guidance scale.

For a Gaussian (eps) model trained with ``ditkit train --recipe digits`` and a flow model trained
with the same recipe and ``--set objective.kind=flow``, draw ``--num-samples`` class-conditional
samples (labels cycling over the 10 classes, sample i seeded ``seed + i``) per setting and seed,
and score them with ``ditkit.eval`` against the training digits: FD in ditkit's classifier
features, improved precision / recall (k = 3) and conditional accuracy. Every setting runs with
each of ``--seeds`` (disjoint seed ranges), so the tables give mean and spread. The floor: the
same metrics for ``--num-samples`` real training images (random class-balanced subsets).

    python benchmarks/eval_samplers.py --ckpt results/digits --flow-ckpt results/digits_flow \\
        --num-samples 500 --precision bf16 --out benchmarks/results/eval_samplers.json

Results are written to ``--out`` after every measurement, so a stopped run keeps what it measured;
``--resume`` skips measurements already there. ``--markdown`` prints the tables of docs/eval.md
from a results file without sampling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from ditkit.eval.model_eval import build_evaluator, eval_labels, evaluate_generator, reference_dataset  # noqa: E402
from ditkit.pipelines.image import ImagePipeline  # noqa: E402

# (sampler, steps, spacing) of the Gaussian table; DDPM 250 uniform is the official DiT setting.
GAUSSIAN_TABLE = [
    ("ddpm", 250, "uniform"), ("ddpm", 100, "uniform"), ("ddpm", 50, "uniform"), ("ddpm", 25, "uniform"),
    ("ddim", 50, "uniform"), ("ddim", 50, "quadratic"), ("ddim", 25, "uniform"), ("ddim", 25, "quadratic"),
    ("dpm++", 25, "uniform"), ("dpm++", 25, "quadratic"), ("dpm++", 10, "uniform"), ("dpm++", 10, "quadratic"),
]
FLOW_TABLE = [("euler", 50, "-"), ("euler", 20, "-"), ("euler", 10, "-"), ("heun", 50, "-"), ("heun", 20, "-"), ("heun", 10, "-")]
METRICS = ("FD", "precision", "recall", "accuracy")


def measure(gen: ImagePipeline, evaluator, n: int, sampler: str, steps: int, spacing: str, cfg: float, seed: int,
            batch_size: int) -> dict:
    results = evaluate_generator(
        gen, evaluator, n, sampler=sampler, num_sampling_steps=steps, cfg_scale=cfg,
        timestep_spacing=None if spacing == "-" else spacing, seed=seed, batch_size=batch_size,
    )
    m = results["metrics"]
    return {
        "FD": m["fd_classifier"], "precision": m["precision"], "recall": m["recall"],
        "accuracy": m["conditional_accuracy"], "seconds": results["sampling"]["sampling_seconds"],
        "checkpoint_sha256": results["sampling"]["checkpoint_sha256"],
    }


def summarise(rows: list[dict], key: tuple) -> dict:
    """Mean and standard deviation over the seeds of one setting."""
    runs = [r for r in rows if tuple(r[k] for k in ("model", "sampler", "steps", "spacing", "cfg")) == key]
    out = {"n_seeds": len(runs), "seconds": statistics.mean(r["seconds"] for r in runs)}
    for m in METRICS:
        values = [r[m] for r in runs]
        out[m] = statistics.mean(values)
        out[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def markdown(record: dict) -> str:
    """The tables of docs/eval.md: mean ± std over seeds."""
    rows = record["rows"]
    keys = []
    for r in rows:
        key = (r["model"], r["sampler"], r["steps"], r["spacing"], r["cfg"])
        if key not in keys:
            keys.append(key)
    order = [("gaussian", *s) for s in GAUSSIAN_TABLE] + [("flow", *s) for s in FLOW_TABLE]
    keys.sort(key=lambda k: (order.index(k[:4]) if k[:4] in order else len(order), k[4]))

    def line(key: tuple) -> str:
        s = summarise(rows, key)
        cells = [f"{s[m]:.1f} ± {s[m + '_std']:.1f}" if m == "FD" else f"{s[m]:.3f} ± {s[m + '_std']:.3f}" for m in METRICS]
        model, sampler, steps, spacing, cfg = key
        return f"| {model} | {sampler} | {steps} | {spacing} | {cfg:g} | " + " | ".join(cells) + f" | {s['seconds']:.0f} |"

    head = ("| model | sampler | steps | spacing | cfg | FD (classifier features) | precision | recall | "
            "conditional accuracy | s per 500 |\n|---|---|---|---|---|---|---|---|---|---|")
    real = [r for r in record.get("real", [])]
    parts = []
    if real:
        fd = [r["FD"] for r in real]
        acc = [r["accuracy"] for r in real]
        parts.append(f"Real training images ({record['num_samples']}, {len(real)} random class-balanced subsets): FD "
                     f"{statistics.mean(fd):.1f} ± {statistics.stdev(fd) if len(fd) > 1 else 0:.1f}, precision "
                     f"{statistics.mean(r['precision'] for r in real):.3f}, recall {statistics.mean(r['recall'] for r in real):.3f}, "
                     f"conditional accuracy {statistics.mean(acc):.3f}.")
    swept = {k[:4] for k in keys if k[4] != record.get("table_cfg")}  # settings with a guidance sweep
    for title, pick in (
        ("Gaussian model, samplers", lambda k: k[0] == "gaussian" and k[4] == record.get("table_cfg")),
        ("Gaussian model, guidance", lambda k: k[0] == "gaussian" and k[:4] in swept),
        ("Flow model, samplers", lambda k: k[0] == "flow" and k[4] == record.get("table_cfg")),
        ("Flow model, guidance", lambda k: k[0] == "flow" and k[:4] in swept),
    ):
        chosen = [k for k in keys if pick(k)]
        if chosen:
            parts.append(f"**{title}**\n\n{head}\n" + "\n".join(line(k) for k in chosen))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="results/digits", help="gaussian run (ditkit train --recipe digits); '' to skip")
    p.add_argument("--flow-ckpt", default="results/digits_flow", help="flow run (--set objective.kind=flow); '' to skip")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 100_000, 200_000])
    p.add_argument("--table-cfg", type=float, default=1.0, help="guidance of the sampler tables")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.25, 1.5, 2.0, 4.0, 6.0], help="the guidance sweep")
    p.add_argument("--gaussian-sweep", default="ddpm:25:uniform,ddpm:50:uniform,ddpm:100:uniform,dpm++:25:uniform", help="settings swept over --cfg-scales")
    p.add_argument("--flow-sweep", default="heun:20:-", help="settings swept over --cfg-scales")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results/eval_samplers.json")
    p.add_argument("--resume", action="store_true", help="keep the measurements already in --out")
    p.add_argument("--markdown", action="store_true", help="print the tables of --out and exit")
    args = p.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    torch.set_num_threads(args.threads)
    record = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    record.update({"machine": machine(), "num_samples": args.num_samples, "precision": args.precision,
                   "table_cfg": args.table_cfg, "command": " ".join(sys.argv)})
    record.setdefault("rows", [])
    record.setdefault("real", [])

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")

    def run(gen: ImagePipeline, evaluator, model: str, sampler: str, steps: int, spacing: str, cfg: float) -> None:
        for seed in args.seeds:
            key = dict(model=model, sampler=sampler, steps=steps, spacing=spacing, cfg=cfg, seed=seed)
            if any(all(r[k] == v for k, v in key.items()) for r in record["rows"]):
                continue
            t0 = time.time()
            row = {**key, **measure(gen, evaluator, args.num_samples, sampler, steps, spacing, cfg, seed, args.batch_size)}
            record["rows"].append(row)
            save()
            print(f"{model} {sampler} {steps} {spacing} cfg {cfg:g} seed {seed}: FD {row['FD']:.2f} P {row['precision']:.3f} "
                  f"R {row['recall']:.3f} acc {row['accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    def sweep_settings(text: str) -> list[tuple[str, int, str]]:
        return [(s, int(n), sp) for s, n, sp in (item.split(":") for item in text.split(",") if item)]

    first = args.ckpt or args.flow_ckpt
    gen = ImagePipeline.from_checkpoint(first, device="cpu", precision=args.precision)
    dataset = reference_dataset(gen.cfg)
    evaluator = build_evaluator(gen.cfg, dataset, verbose=True)
    record["feature_extractor"] = {"hash": evaluator.classifier.hash, "holdout_accuracy": evaluator.classifier.info.get("holdout_accuracy")}

    # the floor: random class-balanced subsets of the real training images, labelled like the samples
    wanted = torch.as_tensor(eval_labels(gen.cfg, args.num_samples))
    for seed in args.seeds:
        if any(r["seed"] == seed for r in record["real"]):
            continue
        g = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(dataset.num_classes):
            members = torch.nonzero(dataset.labels == c).flatten()
            picks.append(members[torch.randperm(len(members), generator=g)[: int((wanted == c).sum())]])
        idx = torch.cat(picks)
        m = evaluator.evaluate(dataset.images[idx], dataset.labels[idx])["metrics"]
        record["real"].append({"seed": seed, "FD": m["fd_classifier"], "precision": m["precision"], "recall": m["recall"],
                               "accuracy": m["conditional_accuracy"]})
        save()

    for model, ckpt, table, sweeps in (
        ("gaussian", args.ckpt, GAUSSIAN_TABLE, sweep_settings(args.gaussian_sweep)),
        ("flow", args.flow_ckpt, FLOW_TABLE, sweep_settings(args.flow_sweep)),
    ):
        if not ckpt:
            continue
        gen = ImagePipeline.from_checkpoint(ckpt, device="cpu", precision=args.precision)
        record.setdefault("checkpoints", {})[model] = {"path": str(gen.checkpoint.dir), "sha256": gen.checkpoint_sha256, "step": gen.step}
        for sampler, steps, spacing in table:
            run(gen, evaluator, model, sampler, steps, spacing, args.table_cfg)
        for sampler, steps, spacing in sweeps:
            for cfg in args.cfg_scales:
                run(gen, evaluator, model, sampler, steps, spacing, cfg)
    save()
    print(markdown(record))


if __name__ == "__main__":
    main()

"""Text-to-image on shapes_captions at equal wall clock: cross-attention DiT (PixArt-alpha) vs MMDiT
(SD3) vs a class-conditional DiT whose classes are the training captions (the baseline that cannot
draw a combination it never saw).

    OMP_NUM_THREADS=1 python benchmarks/text_to_image.py --budget 180s --num-prompts 100
    python benchmarks/text_to_image.py --budget 10m --seeds 2 --jobs 2 --curve-every 1000   # curves, medians

Each variant trains for the same ``--budget`` of training seconds on the same data (the
``shapes_captions`` recipe: 4,096 train-split scenes, batch 64, same optimiser), then draws one
image per evaluation prompt with the same sampler, steps and guidance, and the attribute judge
(``ditkit.eval.attributes``) scores them: per-prompt success in-distribution and on held-out
combinations, per-axis accuracy, FD (judge features), images/s at sampling. The class baseline
gets a class only for captions it trained on; an evaluation prompt without one counts as a
failure (it cannot be drawn).

Every (variant, seed) run is one subprocess with ``--threads`` torch threads, ``--jobs`` at a time
(keep jobs x threads within the physical cores: runs that share a core fit fewer steps in the
budget); a run whose ``result.json`` holds the same settings is skipped, so an interrupted
benchmark continues, and the summary reads only this command's runs. With
``--curve-every N`` a checkpoint is kept every N steps and each is scored the same way after
training (the training seconds of a point are those its checkpoint recorded), giving the curves.
Results: ``--out-dir/results.json`` (every run, its curve and the medians over seeds), the table
of medians on stdout and in ``table.md``, ``curves.png`` (in-distribution success and FD against
training seconds) and ``grid_<variant>.png`` (seed 0's last checkpoint: four evaluation prompts,
one row each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.checkpoint_io import load_training_state
from ditkit.data.captions import shapes_captions
from ditkit.data.images import ImageDataset
from ditkit.eval.attributes import FD_NAME, _fd, eval_scenes, evaluate_text_to_image, load_or_train_judge, score_images
from ditkit.media import make_grid, save_png
from ditkit.pipelines import load
from ditkit.recipes import get_recipe
from ditkit.train.loop import train


MODELS = {"cross": "T2I-CrossDiT-T/4", "mmdit": "T2I-MMDiT-T/4", "class": "DiT-T/4"}
GRID_PROMPTS = 4  # rows of grid_<variant>.png: the first in-distribution evaluation prompts


def _set_run(cfg: Any, budget: str, out: Path, name: str, seed: int, curve_every: int) -> None:
    cfg.train.time_budget, cfg.train.seed = budget, seed
    if curve_every:  # keep every checkpoint: each is a point of the curve
        cfg.train.ckpt_every, cfg.train.keep_last = curve_every, 1_000_000
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(out), name, False


def train_prompt_model(model: str, budget: str, out: Path, name: str | None = None, seed: int = 0,
                       curve_every: int = 0) -> Path:
    cfg = get_recipe("shapes_captions")
    cfg.model.name = model
    _set_run(cfg, budget, out, name or model.replace("/", "-"), seed, curve_every)
    return train(cfg, log=lambda m: print(m, flush=True)).run_dir


def caption_classes() -> tuple[Any, dict[str, int]]:
    """The training scenes and one class per distinct training caption (the canonical one of each scene)."""
    scenes = shapes_captions(4096, seed=0, split="train")
    captions = sorted({r["caption"] for r in scenes.records})
    return scenes, {c: i for i, c in enumerate(captions)}


def train_class_model(budget: str, out: Path, name: str = "class-DiT-T-4", seed: int = 0,
                      curve_every: int = 0) -> tuple[Path, dict[str, int]]:
    """DiT-T/4 with one class per distinct training caption."""
    scenes, index = caption_classes()
    labels = torch.tensor([index[r["caption"]] for r in scenes.records])
    data = ImageDataset(scenes.images, labels, len(index), sorted(index, key=index.get), "shapes_captions as caption classes")
    cfg = get_recipe("shapes_captions")
    cfg.model.name, cfg.model.class_dropout_prob = MODELS["class"], 0.1
    cfg.data.dataset, cfg.data.num_items = "shapes", 4096  # recorded only: the data is passed in
    _set_run(cfg, budget, out, name, seed, curve_every)
    return train(cfg, dataset=data, log=lambda m: print(m, flush=True)).run_dir, index


def evaluate_class_model(run: Path, index: dict[str, int], judge, num_prompts: int, steps: int, scale: float) -> dict:
    pipe = load(run, device="cpu")
    results: dict = {}
    gen_all = []
    seconds, drawn = 0.0, 0
    for split in ("in_distribution", "held_out"):
        scenes = eval_scenes(split, num_prompts)
        known = [i for i, r in enumerate(scenes.records) if r["caption"] in index]
        images = torch.zeros(len(scenes.records), 3, 32, 32) - 1  # black: a prompt it cannot draw
        if known:
            t0 = time.perf_counter()
            out = pipe(class_labels=[index[scenes.records[i]["caption"]] for i in known], num_inference_steps=steps,
                       guidance_scale=scale, seed=0)
            seconds += time.perf_counter() - t0
            drawn += len(known)
            images[known] = out.tensors
            gen_all.append(judge.features(out.tensors).numpy())
        results[split] = score_images(judge, images, scenes.records)
        results[split]["prompts_with_a_class"] = len(known)
    ref = shapes_captions(max(drawn, 2), seed=20_000, split="all", num_captions=1).pixels()
    if gen_all:
        results[FD_NAME] = _fd(np.concatenate(gen_all), judge.features(ref).numpy())
    results["images_per_second"] = drawn / seconds if seconds else None
    return results


def evaluate(variant: str, ckpt: Path, judge: Any, args: argparse.Namespace, index: dict[str, int] | None) -> dict:
    """One checkpoint's scores (``evaluate_text_to_image``, or ``evaluate_class_model`` for the baseline)."""
    if variant == "class":
        return evaluate_class_model(ckpt, index or {}, judge, args.num_prompts, args.steps, args.guidance_scale)
    return evaluate_text_to_image(load(ckpt, device="cpu"), num_prompts=args.num_prompts, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance_scale, judge=judge)


def write_grid(variant: str, ckpt: Path, index: dict[str, int] | None, args: argparse.Namespace, path: Path) -> None:
    """Four images for each of the first ``GRID_PROMPTS`` in-distribution evaluation prompts, a row each
    (black: a prompt the class baseline has no class for)."""
    prompts = [r["caption"] for r in eval_scenes("in_distribution", GRID_PROMPTS).records]
    pipe = load(ckpt, device="cpu")
    if variant == "class":
        known = [p for p in prompts if p in (index or {})]
        rows = {p: torch.zeros(4, 3, 32, 32) - 1 for p in prompts}
        if known:
            out = pipe(class_labels=[index[p] for p in known for _ in range(4)], num_inference_steps=args.steps,
                       guidance_scale=args.guidance_scale, seed=0)
            for k, p in enumerate(known):
                rows[p] = out.tensors[4 * k: 4 * k + 4]
        save_png(make_grid(torch.cat([rows[p] for p in prompts]), nrow=4, scale=4), path,
                 {"prompts": " | ".join(prompts), "layout": "a row per prompt"})
        return
    out = pipe(prompts, num_images_per_prompt=4, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=0)
    save_png(out.grid(), path, {"prompts": " | ".join(prompts), "layout": "a row per prompt, the prompt under it"})


def worker(args: argparse.Namespace) -> None:
    """Train one (variant, seed) run and score its checkpoints; writes ``runs/<name>/result.json``."""
    variant, seed = args.worker.split(":")
    seed_i, runs = int(seed), Path(args.out_dir) / "runs"
    name = f"{variant}-seed{seed_i}"
    shutil.rmtree(runs / name, ignore_errors=True)  # a run that died before its result.json starts over
    judge = load_or_train_judge(image_size=32, log=print)
    t0 = time.perf_counter()
    if variant == "class":
        run, index = train_class_model(args.budget, runs, name, seed_i, args.curve_every)
    else:
        run, index = train_prompt_model(MODELS[variant], args.budget, runs, name, seed_i, args.curve_every), None
    wall_train = time.perf_counter() - t0
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    points = []
    for ckpt in ckpts if args.curve_every else ckpts[-1:]:
        state = load_training_state(ckpt)
        scores = evaluate(variant, ckpt, judge, args, index)
        points.append({"step": int(state["step"]), "train_s": float(state["elapsed_s"]), **scores})
        print(f"{name} step {points[-1]['step']}: in-dist success {scores['in_distribution']['success']:.3f}, "
              f"{FD_NAME} {scores.get(FD_NAME, float('nan')):.1f}", flush=True)
    if seed_i == 0:
        write_grid(variant, ckpts[-1], index, args, Path(args.out_dir) / f"grid_{variant}.png")
    result = {"variant": variant, "seed": seed_i, "model": MODELS[variant], "settings": run_settings(args),
              "wall_train_s": wall_train, "final": points[-1], "curve": points}
    (runs / name / "result.json").write_text(json.dumps(result, indent=1) + "\n")


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(results: list[dict], out: Path) -> str:
    """Medians over seeds of the final scores: the markdown table (also returned)."""
    lines = [f"| variant | seeds | steps | in-dist success | held-out success | shape | colour | size | relation | {FD_NAME} | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    medians = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r["final"] for r in results if r["variant"] == variant]
        acc = lambda k: _median([f["in_distribution"]["accuracy"].get(k) for f in rs])  # noqa: E731
        m = {"seeds": len(rs), "steps": _median([f["step"] for f in rs]),
             "in_dist_success": _median([f["in_distribution"]["success"] for f in rs]),
             "held_out_success": _median([f["held_out"]["success"] for f in rs]),
             **{k: acc(k) for k in ("shape", "colour", "size", "relation")},
             "fd": _median([f.get(FD_NAME) for f in rs]), "images_per_second": _median([f.get("images_per_second") for f in rs])}
        medians[variant] = m
        fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {variant} ({MODELS[variant]}) | {m['seeds']} | {fmt(m['steps'], 0)} | {fmt(m['in_dist_success'])} | "
                     f"{fmt(m['held_out_success'])} | {fmt(m['shape'])} | {fmt(m['colour'])} | {fmt(m['size'])} | "
                     f"{fmt(m['relation'])} | {fmt(m['fd'], 1)} | {fmt(m['images_per_second'], 1)} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"medians": medians, "runs": results}, indent=1) + "\n")
    return table


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {"cross": "tab:blue", "mmdit": "tab:orange", "class": "tab:green"}
    for r in results:
        xs = [p["train_s"] for p in r["curve"]]
        kw = {"color": colours.get(r["variant"]), "marker": "o", "ms": 3, "ls": "-" if r["seed"] == 0 else "--",
              "label": f"{r['variant']} seed {r['seed']}"}
        axes[0].plot(xs, [p["in_distribution"]["success"] for p in r["curve"]], **kw)
        axes[1].plot(xs, [p.get(FD_NAME) for p in r["curve"]], **kw)
    axes[0].set(xlabel="training seconds", ylabel="in-distribution success", title="prompt success (higher is better)")
    axes[1].set(xlabel="training seconds", ylabel=FD_NAME, yscale="log", title="FD in judge features (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="180s", help="training seconds per run (train.time_budget)")
    parser.add_argument("--num-prompts", type=int, default=100, help="evaluation prompts per split")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--out-dir", default="benchmarks/results/text_to_image")
    parser.add_argument("--variants", default="cross,mmdit,class", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per variant (0..N-1); medians are quoted")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one subprocess each)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--curve-every", type=int, default=0, help="keep and score a checkpoint every N steps (0: the last only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a run's result depends on besides its variant and seed: a finished run is reused only
    when these match."""
    keys = ("budget", "num_prompts", "steps", "guidance_scale", "threads", "curve_every")
    return {k: getattr(args, k) for k in keys}


def worker_command(args: argparse.Namespace, variant: str, seed: int) -> list[str]:
    """The subprocess that runs ``(variant, seed)``: this script with ``--worker`` and the run's settings."""
    forwarded = [a for k, v in vars(args).items() if k not in ("worker", "jobs", "seeds", "variants") and v is not None
                 for a in (f"--{k.replace('_', '-')}", str(v))]
    return [sys.executable, str(Path(__file__).resolve()), "--worker", f"{variant}:{seed}", *forwarded]


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        return worker(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in MODELS]
    if unknown:
        parser.error(f"--variants {','.join(unknown)}: choose from {', '.join(MODELS)}")
    out = Path(args.out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    load_or_train_judge(image_size=32, log=print)  # trained once here, read from the cache by every run
    tasks = [(v, s) for v in variants for s in range(args.seeds)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    settings = run_settings(args)

    def finished(variant: str, seed: int) -> dict | None:
        path = out / "runs" / f"{variant}-seed{seed}" / "result.json"
        result = json.loads(path.read_text()) if path.is_file() else None
        return result if result is not None and result.get("settings") == settings else None

    failed: list[str] = []

    def run(task: tuple[str, int]) -> None:
        variant, seed = task
        if finished(variant, seed) is not None:
            print(f"skip {variant} seed {seed}: done with these settings", flush=True)
            return
        log = out / "runs" / f"{variant}-seed{seed}.log"
        print(f"start {variant} seed {seed} (log {log})", flush=True)
        with open(log, "w") as f:
            rc = subprocess.run(worker_command(args, variant, seed), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        print(f"{variant} seed {seed}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'}", flush=True)
        if rc != 0:
            failed.append(f"{variant} seed {seed}")

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(run, tasks))
    results = [r for v, s in tasks if (r := finished(v, s)) is not None]  # this command's runs only
    if not results:
        sys.exit("no run finished: see the logs under " + str(out / "runs"))
    print(summarise(results, out))
    if args.curve_every:
        plot_curves(results, out / "curves.png")
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs under {out / 'runs'})")


if __name__ == "__main__":
    main()

"""Fast sampling at matched quality (issue 21): step caching, samplers x step counts, precision.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fast_sampling.py --run /work/runs/digits --out-dir OUT

For every point (sampler, steps, cache, precision) it draws ``--num-samples`` images through the
normal pipeline (labels cycling over the classes, sample i seeded ``seed + i``, the checkpoint's
guidance scale) in ONE batch, so one batch is one trajectory, and records:

* ``calls/img``: network calls per trajectory (under guidance one call carries the cond and uncond
  halves, 2 rows per image); ``computes/img``: calls that ran the block stack (not reused);
* ``img/s (cpu)``: images per second of process CPU time (OMP_NUM_THREADS=1: one core's work, stable
  on a shared machine) and ``img/s (wall)``;
* FD on the classifier features and conditional accuracy (``ditkit.eval.model_eval.build_evaluator``,
  the features of ``ditkit eval``) against the training data.

Writes ``OUT/results.json``, ``OUT/results.csv``, ``OUT/table.md`` (every point sorted by computes
per image, marked where FD is within 10% of 50-step DDPM's, and the headline speed-ups) and
``OUT/curve.png`` (FD against computes per image; a CSV only without matplotlib). ``--quick``: 50
samples and a handful of points, a smoke test in about a minute.

``--distilled DIR [DIR ...]`` adds few-step students of ``ditkit distill`` (a distillation folder: every
round's student at its own step count, and the last one also at ``--distilled-steps``, default 1 2 4;
or one round's run directory): the same measures through the same pipeline (ddim, the student's cfg
1), and ``OUT/distilled.md`` comparing each FD with the teacher's (``--run``) DDPM-50 FD against the
issue's target, within 25%. ``--distilled-only`` skips the other points (the DDPM-50 reference stays).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one core, comparable CPU seconds

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# (sampler, steps) grid of the sampler comparison and the cache settings tried on top of some of them
SAMPLER_POINTS = [("ddim", 10), ("ddim", 20), ("dpm++", 5), ("dpm++", 10), ("dpm++3m", 5), ("dpm++3m", 10),
                  ("euler_a", 20)]
# TeaCache thresholds are per sampler: without the paper's fitted rescaling the raw relative change of
# the modulated input is ~0.1-0.9 per DDPM-50 step (fresh noise each step) but ~0.03-0.07 per DDIM-20 step.
CACHE_POINTS = [("ddpm", 50, c) for c in ("fora:2", "fora:3", "fora:5", "teacache:0.6", "teacache:1.2")]
CACHE_POINTS += [("ddim", 20, c) for c in ("fora:2", "teacache:0.08")] + [("dpm++", 10, "fora:2")]
# --full: more step counts and knobs (about twice the CPU time)
MORE_SAMPLER_POINTS = [("ddpm", 25), ("ddim", 50), ("dpm++", 20), ("dpm++3m", 20), ("euler_a", 10), ("euler_a", 50)]
MORE_CACHE_POINTS = [("ddpm", 50, "teacache:0.3"), ("ddim", 50, "fora:3"), ("ddim", 50, "teacache:0.1"),
                     ("ddim", 20, "fora:3"), ("ddim", 20, "teacache:0.15"), ("dpm++", 10, "teacache:0.1")]


@dataclass
class Point:
    sampler: str
    steps: int
    cache: Optional[str] = None
    precision: str = "fp32"
    seed: int = 0

    @property
    def name(self) -> str:
        extra = "".join(f" {v}" for v in (self.cache, None if self.precision == "fp32" else self.precision,
                                          None if self.seed == 0 else f"seed{self.seed}") if v)
        return f"{self.sampler}-{self.steps}{extra}"


def default_points(quick: bool, full: bool = False) -> list[Point]:
    if quick:
        return [Point("ddpm", 50), Point("ddpm", 50, "fora:3"), Point("ddpm", 50, "teacache:0.2"),
                Point("dpm++", 10), Point("ddpm", 50, precision="bf16")]
    points = [Point("ddpm", 50), Point("ddpm", 50, seed=10_000), Point("ddpm", 50, precision="bf16")]
    points += [Point(s, k) for s, k in SAMPLER_POINTS + (MORE_SAMPLER_POINTS if full else [])]
    points += [Point(s, k, c) for s, k, c in CACHE_POINTS + (MORE_CACHE_POINTS if full else [])]
    points += [Point("ddpm", 50, "fora:3", "bf16")]
    return points


class CallCounter:
    """Counts forward calls of the network (a pre-hook on the model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, inputs: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


def run_point(pipes: dict[str, Any], evaluator: Any, point: Point, num_samples: int) -> dict[str, Any]:
    pipe = pipes[point.precision]
    k = pipe.num_classes
    labels = [i % k for i in range(num_samples)] if k else None
    counter = CallCounter(pipe.model)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        out = pipe(class_labels=labels, num_samples=num_samples, sampler=point.sampler, num_inference_steps=point.steps,
                   seed=point.seed, batch_size=num_samples, cache=point.cache, allow_untrained_uncond=True)
    finally:
        counter.close()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    reused = int(out.metadata["cache_reuse"].split()[1]) if point.cache else 0
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    metrics = evaluator.evaluate(out.tensors, y, out.metadata)["metrics"]
    return {
        **asdict(point), "name": point.name, "num_samples": num_samples, "cfg_scale": float(out.metadata["cfg_scale"]),
        "calls_per_image": counter.calls, "computes_per_image": counter.calls - reused,
        "cpu_seconds": round(cpu_s, 2), "wall_seconds": round(wall_s, 2),
        "images_per_s_cpu": round(num_samples / cpu_s, 2), "images_per_s_wall": round(num_samples / wall_s, 2),
        "fd_classifier": round(metrics["fd_classifier"], 4),
        "conditional_accuracy": round(metrics.get("conditional_accuracy", float("nan")), 4),
        "precision_metric": round(metrics.get("precision", float("nan")), 4),
        "recall": round(metrics.get("recall", float("nan")), 4),
    }


TEXT_CACHES = (None, "fora:2", "fora:3", "fora:4", "teacache:0.05", "teacache:0.1", "teacache:0.2", "teacache:0.4")


def run_text(run: str, num_samples: int, out: Path) -> str:
    """A masked text DiT with the step cache off and on: tokens/s (cpu and wall), computed calls and
    the validity of the synthetic corpus's documents (``ditkit.eval.text_model.synthetic_checker``).
    The likelihood bound (bits per character) is a property of the network, not of the sampler, so
    caching cannot change it. Writes ``OUT/text.md`` and returns it."""
    import ditkit
    from ditkit.eval.text import fraction_valid
    from ditkit.eval.text_model import synthetic_checker

    pipe = ditkit.load(run, device="cpu", precision="fp32")
    checker = synthetic_checker(pipe.cfg, pipe.class_names)
    steps = pipe.cfg.sample.num_sampling_steps
    # warm-up at the full batch: first-call and first-touch memory costs stay out of the timings
    pipe(num_samples=num_samples, num_inference_steps=2, seed=0, batch_size=num_samples)
    lines = [f"Text: {run} ({pipe.cfg.model.name}, {pipe.cfg.data.dataset}), {num_samples} samples of "
             f"{pipe.cfg.data.seq_len} tokens, {steps} steps, one batch.", "",
             "| cache | calls | computes | tokens/s (cpu) | tokens/s (wall) | valid documents |", "|---|---|---|---|---|---|"]
    for cache in TEXT_CACHES:
        counter = CallCounter(pipe.model)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            res = pipe(num_samples=num_samples, num_inference_steps=steps, seed=0, batch_size=num_samples,
                       at_document_start=False, cache=cache)
        finally:
            counter.close()
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        reused = int(res.metadata["cache_reuse"].split()[1]) if cache else 0
        n_tok = res.tokens.numel()
        valid = fraction_valid(res.tokens, pipe.tokenizer, lambda text: checker(text, None))["fraction_valid"] if checker else float("nan")
        lines.append(f"| {cache or 'none'} | {counter.calls} | {counter.calls - reused} | {n_tok / cpu_s:.0f} | "
                     f"{n_tok / wall_s:.0f} | {valid:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (out / "text.md").write_text(text)
    return text


def distilled_students(path: str, extra_steps: list[int]) -> list[tuple[Path, int]]:
    """``(run directory, steps)`` to score for ``path``: a ``ditkit distill`` folder gives every done
    round's student at its own steps and the last one also at ``extra_steps``; a run gives itself at
    its recorded ``sample.num_sampling_steps`` and ``extra_steps``."""
    from ditkit.cli.distill import PLAN_FILE

    folder = Path(path)
    if (folder / PLAN_FILE).is_file():
        plan = json.loads((folder / PLAN_FILE).read_text())
        done = [r for r in plan["rounds"] if r.get("done")]
        if not done:
            raise SystemExit(f"--distilled {path}: no finished round yet (continue it with ditkit distill --resume {path})")
        pairs = [(Path(r["run"]), int(r["student_steps"])) for r in done]
    else:
        from ditkit.checkpoint_io import Checkpoint

        pairs = [(folder, Checkpoint.open(folder).config.sample.num_sampling_steps)]
    last = pairs[-1][0]
    pairs += [(last, k) for k in extra_steps if (last, k) not in pairs]
    return pairs


def run_distilled(paths: list[str], extra_steps: list[int], evaluator: Any, n: int, reference: Optional[dict[str, Any]],
                  out: Path) -> list[dict[str, Any]]:
    """Score the students of ``paths`` (``distilled_students``) through the pipeline at their step
    counts; write ``OUT/distilled.md`` against the teacher's DDPM-50 FD (``reference``, a row)."""
    import ditkit

    rows = []
    for path in paths:
        for run, steps in distilled_students(path, extra_steps):
            pipe = ditkit.load(run, device="cpu", precision="fp32")
            pipe(num_samples=n, num_inference_steps=1, seed=0, batch_size=n)  # warm-up, as for the teacher
            row = run_point({"fp32": pipe}, evaluator, Point("ddim", steps), n)
            trained = pipe.cfg.sample.num_sampling_steps
            label = f"{run.parent.name}/{run.name}" if run.name.startswith("round_") else run.name
            row.update(name=f"distilled {label} @{steps}", student=label, distilled=str(run), trained_steps=trained,
                       distilled_cfg_scale=pipe.cfg.objective.teacher_cfg_scale)
            rows.append(row)
            print(f"{row['name']:28s} calls {row['calls_per_image']:3d} img/s cpu {row['images_per_s_cpu']:7.1f} "
                  f"FD {row['fd_classifier']:.3f} acc {row['conditional_accuracy']:.3f}", flush=True)
    lines = ["| student | trained for | sampled at | calls/img | img/s (cpu) | FD (classifier) | cond. acc. | FD / teacher DDPM-50 | within 25% |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = reference["fd_classifier"] if reference else None
    for r in rows:
        ratio = f"{r['fd_classifier'] / base:.2f}" if base else "-"
        ok = "yes" if base and r["fd_classifier"] <= 1.25 * base else ""
        lines.append(f"| {r['student']} | {r['trained_steps']} steps | {r['steps']} steps | {r['calls_per_image']} | "
                     f"{r['images_per_s_cpu']:.1f} | {r['fd_classifier']:.3f} | {r['conditional_accuracy']:.3f} | {ratio} | {ok} |")
    head = (f"Teacher DDPM-50 FD {base:.3f} (cfg {reference['cfg_scale']:g}); target: a 4-step student within 25%, "
            f"FD <= {1.25 * base:.3f}." if base else "No DDPM-50 reference in this run (add the ddpm-50 point).")
    text = head + "\n\n" + "\n".join(lines) + "\n"
    (out / "distilled.md").write_text(text)
    print(text)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> str:
    """Markdown: every point by computes per image, with the 10%-of-DDPM-50 mark and the headlines."""
    base = next((r for r in rows if r["name"] == "ddpm-50"), None)
    if base is None:  # a partial run (--only without ddpm-50): the rows only; --merge writes the table
        text = "\n".join(json.dumps(r) for r in rows) + "\n"
        path.write_text(text)
        return text
    limit = 1.10 * base["fd_classifier"]
    lines = [f"Reference: ddpm-50 fp32 FD {base['fd_classifier']:.3f}; within 10%: FD <= {limit:.3f}.", "",
             "| point | calls/img | computes/img | img/s (cpu) | img/s (wall) | FD (classifier) | cond. acc. | within 10% |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["computes_per_image"], r["fd_classifier"])):
        ok = "yes" if r["fd_classifier"] <= limit else ""
        lines.append(f"| {r['name']} | {r['calls_per_image']} | {r['computes_per_image']} | {r['images_per_s_cpu']:.1f} | "
                     f"{r['images_per_s_wall']:.1f} | {r['fd_classifier']:.3f} | {r['conditional_accuracy']:.3f} | {ok} |")
    within = [r for r in rows if r["fd_classifier"] <= limit]
    lines.append("")
    if within:
        fewest = min(within, key=lambda r: (r["computes_per_image"], r["fd_classifier"]))
        lines.append(f"Fewest computed calls within 10% of ddpm-50's FD: {fewest['name']} "
                     f"({fewest['computes_per_image']} of {fewest['calls_per_image']} calls, FD {fewest['fd_classifier']:.3f}).")
    # caching alone: same sampler, steps and precision, cache on vs off
    for r in rows:
        if not r["cache"]:
            continue
        ref = next((b for b in rows if b["sampler"] == r["sampler"] and b["steps"] == r["steps"] and not b["cache"]
                    and b["precision"] == r["precision"] and b["seed"] == r["seed"]), None)
        if ref is None:
            continue
        r["speedup_vs_uncached"] = round(r["images_per_s_cpu"] / ref["images_per_s_cpu"], 2)
        r["fd_vs_uncached"] = round(r["fd_classifier"] / ref["fd_classifier"], 3)
    cached = [r for r in rows if "speedup_vs_uncached" in r and r["fd_vs_uncached"] <= 1.10]
    if cached:
        best = max(cached, key=lambda r: r["speedup_vs_uncached"])
        lines.append(f"Caching alone, FD within 10% of the same sampler uncached: best {best['name']}, "
                     f"{best['speedup_vs_uncached']}x images/s (cpu), FD x{best['fd_vs_uncached']}.")
    else:
        lines.append("Caching alone: no cache setting kept FD within 10% of the same sampler uncached.")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_curve(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        # uncached: one line per sampler over step counts; cached: one per sampler-steps and rule over the knob
        key = f"{r['sampler']}-{r['steps']} + {r['cache'].split(':')[0]}" if r["cache"] else r["sampler"]
        key += "" if r["precision"] == "fp32" else f" {r['precision']}"
        key += "" if r["seed"] == 0 else f" (seed {r['seed']}: the seed spread)"
        groups.setdefault(key, []).append(r)
    for key, pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda r: r["computes_per_image"])
        ax.plot([p["computes_per_image"] for p in pts], [p["fd_classifier"] for p in pts], "o-" if "cache" not in key else "s--",
                label=key, markersize=4)
    base = next((r for r in rows if r["name"] == "ddpm-50"), None)
    if base is not None:
        ax.axhline(1.10 * base["fd_classifier"], color="grey", lw=0.8, ls=":", label="ddpm-50 FD + 10%")
    ax.set_xscale("log")
    ax.set_xlabel("block-stack computes per image (network calls not reused)")
    ax.set_ylabel("FD (classifier features)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory or checkpoint (an image model)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="50 samples, 5 points: a smoke test")
    parser.add_argument("--full", action="store_true", help="more step counts and cache knobs (about 2x the time)")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="run only the points of these names, e.g. "
                        "'ddpm-50' 'ddpm-50 fora:3' (for two halves side by side, then --merge)")
    parser.add_argument("--text-run", help="also a masked text run: tokens/s and validity with the cache off and on")
    parser.add_argument("--text-samples", type=int, default=256)
    parser.add_argument("--text-only", action="store_true", help="only the text part")
    parser.add_argument("--distilled", nargs="+", metavar="DIR",
                        help="also score ditkit distill students (a distillation folder or a round's run) against --run's DDPM-50")
    parser.add_argument("--distilled-steps", nargs="+", type=int, default=[1, 2, 4], metavar="N",
                        help="step counts to sample the last student at besides its own (default 1 2 4)")
    parser.add_argument("--distilled-only", action="store_true", help="with --distilled: only ddpm-50 and the students")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                        help="no sampling: merge the rows of earlier runs (e.g. two --only halves run side by side)")
    args = parser.parse_args(argv)
    import ditkit
    from ditkit.eval.model_eval import build_evaluator

    n = 50 if args.quick else args.num_samples
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.text_run:
        print(run_text(args.text_run, args.text_samples, out))
    if args.text_only:
        return 0
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        seen: set[str] = set()  # each half ran ddpm-50 (the reference): keep the first of each point
        rows = [r for part in parts for r in part["rows"] if not (r["name"] in seen or seen.add(r["name"]))]
        finish(rows, {**parts[0]["meta"], "merged_from": args.merge}, out)
        return 0
    pipes = {p: ditkit.load(args.run, device="cpu", precision=p) for p in ("fp32", "bf16")}
    evaluator = build_evaluator(pipes["fp32"].cfg, device="cpu")
    for pipe in pipes.values():  # warm-up at the full batch: first-call and first-touch memory costs stay out
        pipe(num_samples=n, num_inference_steps=2, sampler="ddim", seed=0, batch_size=n, allow_untrained_uncond=True)
    points = [Point("ddpm", 50)] if args.distilled_only else default_points(args.quick, args.full)
    if args.only:
        unknown = set(args.only) - {p.name for p in points}
        if unknown:
            parser.error(f"--only: no points named {sorted(unknown)}; the points: {[p.name for p in points]}")
        points = [p for p in points if p.name in args.only]
    rows = []
    for point in points:
        row = run_point(pipes, evaluator, point, n)
        rows.append(row)
        print(f"{row['name']:28s} calls {row['calls_per_image']:3d} computes {row['computes_per_image']:3d} "
              f"img/s cpu {row['images_per_s_cpu']:7.1f} wall {row['images_per_s_wall']:7.1f} "
              f"FD {row['fd_classifier']:.3f} acc {row['conditional_accuracy']:.3f}", flush=True)
    if args.distilled:
        reference = next((r for r in rows if r["name"] == "ddpm-50"), None)
        rows += run_distilled(args.distilled, args.distilled_steps, evaluator, n, reference, out)
    meta = {"run": str(args.run), "checkpoint": str(pipes["fp32"].checkpoint.dir), "step": pipes["fp32"].step, "num_samples": n,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    finish(rows, meta, out)
    return 0


def finish(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """Write results.json / results.csv / table.md / curve.png for ``rows``."""
    table = write_table(rows, out / "table.md")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        fields = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    curve = write_curve(rows, out / "curve.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}" + (f", {curve}" if curve else " (no matplotlib: CSV only)"))


if __name__ == "__main__":
    raise SystemExit(main())

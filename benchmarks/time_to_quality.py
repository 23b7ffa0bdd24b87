"""Time to quality: how much training does each recipe need to reach a sample quality? (issue 16)

    OMP_NUM_THREADS=1 python benchmarks/time_to_quality.py                    # digits, every variant, 2 seeds, 10 min each
    OMP_NUM_THREADS=1 python benchmarks/time_to_quality.py --datasets digits,mnist --jobs 2
    OMP_NUM_THREADS=1 python benchmarks/time_to_quality.py --budget 20s --variants paper,recommended \\
        --seeds 1 --eval-every 20 --out /tmp/ttq                               # a smoke run (a few minutes)

Trains the same model (the ``digits`` / ``mnist`` recipe's DiT-XS/4, batch 128, same precision) on the same
data for the same wall-clock budget of training seconds (``train.time_budget``; evaluation pauses that
clock) with

* ``paper``: the official DiT recipe (``digits_paper`` / ``mnist_paper``: eps + learned sigma, linear
  schedule, AdamW lr 1e-4 constant, EMA 0.9999 without warm-up);
* each option alone on top of it (``VARIANTS``: min-SNR-5, EMA warm-up with decay 0.999, the
  LightningDiT block refinements, lr 1e-3 with warm-up + warmup-stable-decay, flow matching with
  logit-normal times, EDM);
* ``recommended``: ditkit's own ``digits`` / ``mnist`` recipe, plus ``--recommended-set KEY=VALUE``
  (what the options above show helps; ``results.json`` lists the candidates under ``suggested``).

Every ``--eval-every`` steps the EMA model draws ``--eval-samples`` samples (labels cycling over the
classes, fixed seeds) with one cheap protocol shared by all variants, about 50 network calls per sample
(``EVAL_SAMPLERS``: DDPM-50, flow Heun-25, EDM Heun-25) at guidance ``--eval-cfg``, scored by FD on the
feature classifier's features and conditional accuracy (``ditkit.eval.model_eval.PeriodicEvaluator``,
which samples with the run's ``sample`` section: that is where the protocol is set). After the budget
the final checkpoint is scored the same way, so every run has a point at exactly the budget.

Then, on the ``recommended`` run's final checkpoint (seed 0), the sampling part: FD of
``--sampling-samples`` samples per sampler and step count (``SAMPLING_STEPS``), the fewest steps per
sampler within 10% of the best FD seen, and the images/s there (one thread per job).

Writes into ``--out`` (default benchmarks/results/time_to_quality): ``runs/DATASET/VARIANT/seedK``
(ditkit run directories; ``final.json`` marks a finished one, which a rerun skips), ``results.json``,
``table.md`` and ``curves_DATASET.png`` (FD against training seconds and training FLOPs, accuracy against
seconds). docs/time_to_quality.md explains how to read them.

Up to ``--jobs`` runs train at a time, each a subprocess with ``OMP_NUM_THREADS=--threads`` (default 1),
so they share the machine; a job's training seconds are its own wall clock, so running more jobs than
cores slows every variant alike but makes the seconds larger.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "time_to_quality"

# ---- what is compared -----------------------------------------------------------------------------

# dataset -> (the paper recipe, ditkit's recommended recipe): same data, model, batch and precision
RECIPES = {"digits": ("digits_paper", "digits"), "mnist": ("mnist_paper", "mnist")}


@dataclass(frozen=True)
class Variant:
    """One training recipe of the comparison: ``overrides`` (config keys) on top of ``base``
    (``"paper"``: the ``*_paper`` recipe; ``"recommended"``: ditkit's recipe of the dataset)."""

    name: str
    summary: str
    base: str = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("paper", "official DiT recipe (eps + learned sigma, linear, lr 1e-4 constant, EMA 0.9999, no warm-up)"),
    Variant("min_snr", "min-SNR-5 loss weighting (Hang et al. 2023)",
            overrides={"objective.loss_weighting": "min_snr", "objective.min_snr_gamma": 5.0}),
    Variant("ema_warmup", "EMA warm-up (1+n)/(10+n) with a shorter decay, 0.999",
            overrides={"train.ema_warmup": True, "train.ema_decay": 0.999}),
    Variant("lightning", "LightningDiT blocks: RMSNorm, SwiGLU, 2-D RoPE, QK-norm",
            overrides={"model.norm": "rmsnorm", "model.mlp": "swiglu", "model.pos_embed": "rope", "model.qk_norm": True}),
    Variant("lr_wsd", "lr 1e-3, 100 warm-up steps, warmup-stable-decay (last 20% to 0), grad clip 1",
            overrides={"train.lr": 1e-3, "train.warmup_steps": 100, "train.lr_schedule": "wsd",
                       "train.decay_fraction": 0.2, "train.min_lr_ratio": 0.0, "train.grad_clip": 1.0}),
    Variant("flow", "flow matching (rectified flow) with logit-normal times (SD3)",
            overrides={"objective.kind": "flow", "objective.time_sampling": "logit_normal",
                       "objective.learn_sigma": False, "sample.sampler": "heun"}),
    Variant("edm", "EDM (Karras et al. 2022): preconditioning, log-normal sigma, lambda(sigma) weighting",
            overrides={"objective.kind": "edm", "objective.learn_sigma": False, "sample.sampler": "edm_heun"}),
    Variant("maskdit", "MaskDiT (Zheng et al. 2023): 50% of the patch tokens dropped before the encoder, a 2-block "
            "decoder, MAE weight 0.1, the last 10% unmasked (learned sigma off: the masked loss has no vb term)",
            overrides={"objective.mask_ratio": 0.5, "model.decoder_depth": 2, "objective.unmask_fraction": 0.1,
                       "objective.learn_sigma": False}),
    Variant("recommended_maskdit", "ditkit's recipe with MaskDiT token masking (as maskdit)", base="recommended",
            overrides={"objective.mask_ratio": 0.5, "model.decoder_depth": 2, "objective.unmask_fraction": 0.1}),
    Variant("recommended", "ditkit's recipe of the dataset (+ --recommended-set)", base="recommended"),
)}
OPTIONS = [name for name, v in VARIANTS.items() if v.base == "paper" and name != "paper"]

# the in-training evaluation: (sampler, steps) per objective family, about 50 network calls each
# (Heun: 2N - 1 calls for N steps)
EVAL_SAMPLERS = {"gaussian": ("ddpm", 50), "flow": ("heun", 25), "edm": ("edm_heun", 25)}

# the sampling part: step counts tried per sampler of the recommended run's family
SAMPLING_STEPS = {
    "gaussian": {"ddpm": (25, 50, 100, 250), "ddim": (10, 25, 50, 100), "dpm++": (5, 10, 15, 25, 50)},
    "flow": {"euler": (10, 25, 50, 100), "heun": (5, 10, 15, 25, 50)},
    "edm": {"edm_euler": (10, 25, 50, 100), "edm_heun": (5, 10, 15, 25, 50)},
}
WITHIN = 0.10  # "matched quality": FD within 10% of the best FD of the sampling part
FINAL_FILE = "final.json"  # RUN/final.json: written last by a finished run (what a rerun skips)


# ---- pure parts (tested in tests/test_time_to_quality.py) ----------------------------------------


def training_flops(step: int, forward_macs: float, batch_size: int) -> float:
    """Training FLOPs after ``step`` optimiser steps of ``batch_size`` images: forward + backward is
    3 forward passes (``forward_macs`` multiply-accumulates per image each), 2 FLOPs per MAC."""
    return 2.0 * 3.0 * forward_macs * batch_size * step


def parse_metrics(lines: Sequence[str]) -> list[dict[str, float]]:
    """The evaluation curve of a run's ``metrics.jsonl`` lines: ``[{step, train_s, fd_classifier,
    conditional_accuracy}]`` in step order. An evaluation line's ``train_s`` is its own when it has
    one, else that of the training log line of the same step, else interpolated linearly in the
    step between the log lines around it (extrapolated from the nearest two at the ends). Torn or
    unreadable lines are skipped; a later line for the same step replaces an earlier one."""
    logs: dict[int, float] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        step = int(rec["step"])
        if "fd_classifier" in rec:
            evals[step] = rec
        elif "train_s" in rec:
            logs[step] = float(rec["train_s"])
    curve = []
    for step in sorted(evals):
        rec = evals[step]
        train_s = rec.get("train_s", logs.get(step))
        if train_s is None:
            train_s = _interpolate(step, logs)
        if train_s is None:
            continue
        curve.append({"step": step, "train_s": float(train_s), "fd_classifier": float(rec["fd_classifier"]),
                      "conditional_accuracy": float(rec.get("conditional_accuracy", math.nan))})
    return curve


def _interpolate(step: int, points: dict[int, float]) -> Optional[float]:
    """Value at ``step`` on the piecewise-linear function through ``points`` (step -> value); the
    end segments extend outside; None with fewer than two points (one: that value)."""
    if not points:
        return None
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    lo = max([x for x in xs if x <= step], default=None)
    hi = min([x for x in xs if x >= step], default=None)
    if lo is not None and lo == hi:
        return points[lo]
    if lo is None:
        lo, hi = xs[0], xs[1]
    elif hi is None:
        lo, hi = xs[-2], xs[-1]
    return points[lo] + (points[hi] - points[lo]) * (step - lo) / (hi - lo)


def seconds_to_reach(curve: Sequence[dict[str, float]], target_fd: float, key: str = "train_s") -> Optional[float]:
    """Training seconds (or another ``key`` of the points, e.g. ``flops``) at which the FD curve first
    reaches ``target_fd`` (FD <= target): linear interpolation between the last point above the target
    and the first at or below it; the first point's own value if it is already there. None if never."""
    previous = None
    for point in curve:
        fd = point["fd_classifier"]
        if fd <= target_fd:
            if previous is None or previous["fd_classifier"] == fd:
                return float(point[key])
            share = (previous["fd_classifier"] - target_fd) / (previous["fd_classifier"] - fd)
            return float(previous[key] + share * (point[key] - previous[key]))
        previous = point
    return None


def median_reached(values: Sequence[Optional[float]]) -> Optional[float]:
    """Median over seeds where None (not reached) counts as infinitely late: None when the median is
    (e.g. one of two seeds not reached), else the median of the numbers."""
    if not values:
        return None
    med = statistics.median([math.inf if v is None else float(v) for v in values])
    return None if math.isinf(med) else med


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(kept) if kept else None


def summarise(runs: Sequence[dict[str, Any]], budget_s: float) -> dict[str, Any]:
    """Per dataset: the target (median final FD of the ``paper`` runs) and one row per variant:
    seconds (and FLOPs) to reach it per seed and their median (``median_reached``), that time as a
    fraction of the budget and as a speed-up over the paper recipe (budget / seconds: the paper recipe
    reaches its final FD at the budget; its own row may read "not reached" since the target is the
    median of its seeds' finals, which its worse seeds end above), and the medians of the
    final FD, accuracy, steps and training FLOPs. ``runs``: dicts with ``dataset, variant, seed,
    curve`` (points with ``train_s``, ``flops``, ``fd_classifier``) and ``final`` (its metrics),
    ``steps``, ``train_flops``."""
    out: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        of_dataset = [r for r in runs if r["dataset"] == dataset]
        paper = [r["final"]["fd_classifier"] for r in of_dataset if r["variant"] == "paper" and "fd_classifier" in r["final"]]
        target = statistics.median(paper) if paper else None
        rows = []
        for variant in dict.fromkeys(r["variant"] for r in of_dataset):
            mine = sorted((r for r in of_dataset if r["variant"] == variant), key=lambda r: r["seed"])
            seconds = [seconds_to_reach(r["curve"], target) if target is not None else None for r in mine]
            flops = [seconds_to_reach(r["curve"], target, key="flops") if target is not None else None for r in mine]
            rows.append({
                "variant": variant, "seeds": [r["seed"] for r in mine],
                "seconds_to_target": median_reached(seconds), "seconds_to_target_per_seed": seconds,
                "diverged_per_seed": [r.get("stop_reason") == "diverged" for r in mine],
                "flops_to_target": median_reached(flops),
                "final_fd": _median([r["final"].get("fd_classifier") for r in mine]),
                "final_fd_per_seed": [r["final"].get("fd_classifier") for r in mine],
                "final_accuracy": _median([r["final"].get("conditional_accuracy") for r in mine]),
                "final_fd_raw": _median([(r.get("final_raw") or {}).get("fd_classifier") for r in mine]),
                "final_accuracy_raw": _median([(r.get("final_raw") or {}).get("conditional_accuracy") for r in mine]),
                "steps": _median([r.get("steps") for r in mine]),
                "train_flops": _median([r.get("train_flops") for r in mine]),
            })
        for row in rows:  # the paper recipe reaches its final FD at the budget, by definition
            s = row["seconds_to_target"]
            row["fraction_of_budget"] = None if s is None else s / budget_s
            row["speedup_vs_paper"] = None if s is None or s <= 0 else budget_s / s
        out[dataset] = {"target_fd": target, "rows": rows}
    return out


def suggest(summary: dict[str, Any]) -> dict[str, list[str]]:
    """Per dataset, the single options (``OPTIONS``) that reached the paper's final FD sooner than the
    paper recipe itself and ended with a lower final FD: candidates for ``--recommended-set``."""
    out = {}
    for dataset, entry in summary.items():
        rows = {row["variant"]: row for row in entry["rows"]}
        paper = rows.get("paper")
        helped = []
        for name in OPTIONS:
            row = rows.get(name)
            if row is None or paper is None or row["seconds_to_target"] is None or row["final_fd"] is None:
                continue
            sooner = paper["seconds_to_target"] is None or row["seconds_to_target"] < paper["seconds_to_target"]
            if sooner and paper["final_fd"] is not None and row["final_fd"] < paper["final_fd"]:
                helped.append(name)
        out[dataset] = helped
    return out


def fewest_steps(rows: Sequence[dict[str, Any]], within: float = WITHIN) -> list[dict[str, Any]]:
    """The sampling part's verdict: the best FD over every (sampler, steps) row, then per sampler the
    row with the fewest steps whose FD is within ``within`` of it (FD <= (1 + within) * best), or a
    row ``{"sampler", "steps": None, "best_fd", "best_steps"}`` when none of its step counts is."""
    if not rows:
        return []
    best = min(r["fd_classifier"] for r in rows)
    out = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["steps"])
        own_best = min(mine, key=lambda r: r["fd_classifier"])
        ok = [r for r in mine if r["fd_classifier"] <= (1 + within) * best]
        entry = {"sampler": sampler, "overall_best_fd": best, "best_fd": own_best["fd_classifier"],
                 "best_steps": own_best["steps"]}
        if ok:
            entry.update(steps=ok[0]["steps"], fd_classifier=ok[0]["fd_classifier"],
                         conditional_accuracy=ok[0].get("conditional_accuracy"), images_per_sec=ok[0].get("images_per_sec"))
        else:
            entry.update(steps=None)
        out.append(entry)
    return out


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def format_table(summary: dict[str, Any], budget_s: float) -> str:
    """Markdown: per dataset, the target and one row per variant (seconds to the paper's final FD,
    "not reached" when the median seed does not reach it)."""
    parts = []
    for dataset, entry in summary.items():
        target = entry["target_fd"]
        parts.append(f"### {dataset}: seconds to reach the paper recipe's final FD "
                     f"({_fmt(target, '.2f') if target is not None else 'not measured'}), budget {budget_s:.0f} s\n")
        parts.append("| variant | seconds to paper's final FD (median) | per seed | share of budget | speed-up (budget / seconds) "
                     "| final FD (median) | final accuracy (median) | raw weights: final FD / accuracy | steps | training PFLOPs |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in entry["rows"]:
            s = row["seconds_to_target"]
            per_seed = ", ".join("diverged" if bad else "not reached" if v is None else f"{v:.0f}"
                                 for v, bad in zip(row["seconds_to_target_per_seed"], row.get("diverged_per_seed", ())))
            flops = row.get("train_flops")
            parts.append(
                f"| {row['variant']} | {'not reached' if s is None else f'{s:.0f}'} | {per_seed} "
                f"| {_fmt(row['fraction_of_budget'], '.2f')} | {_fmt(row['speedup_vs_paper'], '.2f')}"
                f"{'x' if row['speedup_vs_paper'] is not None else ''} | {_fmt(row['final_fd'], '.2f')} "
                f"| {_fmt(row['final_accuracy'], '.3f')} "
                f"| {_fmt(row.get('final_fd_raw'), '.2f')} / {_fmt(row.get('final_accuracy_raw'), '.3f')} | {_fmt(row['steps'], '.0f')} "
                f"| {_fmt(None if flops is None else flops / 1e15, '.3g')} |"
            )
        parts.append("")
    return "\n".join(parts)


def format_sampling_table(dataset: str, verdict: Sequence[dict[str, Any]], num_samples: int, cfg_scale: float) -> str:
    """Markdown: the fewest steps per sampler within 10% of the best FD, and images/s there."""
    lines = [f"### {dataset}: sampling cost at matched quality (recommended run, {num_samples} samples, guidance {cfg_scale})\n",
             "| sampler | fewest steps within 10% of the best FD | FD there | accuracy there | images/s there "
             "| sampler's best FD (steps) |", "|---|---|---|---|---|---|"]
    for row in verdict:
        steps = "not within 10%" if row["steps"] is None else str(row["steps"])
        lines.append(f"| {row['sampler']} | {steps} | {_fmt(row.get('fd_classifier'), '.2f')} "
                     f"| {_fmt(row.get('conditional_accuracy'), '.3f')} | {_fmt(row.get('images_per_sec'), '.1f')} "
                     f"| {row['best_fd']:.2f} ({row['best_steps']}) |")
    if verdict:
        lines.append(f"\nbest FD over all samplers and step counts: {verdict[0]['overall_best_fd']:.2f}")
    return "\n".join(lines) + "\n"


# ---- configs -------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What every run of one benchmark invocation shares."""

    budget: str = "10m"
    eval_every: int = 200
    eval_samples: int = 200
    eval_cfg: float = 1.5
    out: Path = DEFAULT_OUT
    recommended_set: dict[str, str] = field(default_factory=dict)
    extra_set: dict[str, str] = field(default_factory=dict)  # --set: applied to every run, last


def objective_family(kind: str) -> str:
    """The sampler family of an objective kind (``gaussian``, ``flow``, ``edm``)."""
    import ditkit.diffusion  # noqa: F401  (registers the objectives)
    from ditkit.registry import OBJECTIVES

    return OBJECTIVES.get(kind).family


def variant_config(variant: str, dataset: str, seed: int, settings: Settings) -> Any:
    """The validated ``Config`` of one run: the variant's recipe, then the benchmark's budget,
    evaluation protocol and run directory (``OUT/runs/DATASET/VARIANT/seedK``), then ``--set``."""
    from ditkit.config import RunConfig, apply_overrides
    from ditkit.errors import ConfigError
    from ditkit.recipes import get_recipe

    if dataset not in RECIPES:
        raise ConfigError(f"--datasets {dataset}: choose from {', '.join(RECIPES)}")
    if variant not in VARIANTS:
        raise ConfigError(f"--variants {variant}: choose from {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    paper, recommended = RECIPES[dataset]
    cfg = get_recipe(recommended if v.base == "recommended" else paper)
    cfg = apply_overrides(cfg, {**v.overrides, **settings.recommended_set} if v.base == "recommended" else v.overrides)
    t = cfg.train
    t.time_budget, t.max_steps, t.epochs = settings.budget, None, None  # the budget alone ends every run
    t.eval_every, t.eval_samples, t.keep_best = settings.eval_every, settings.eval_samples, False
    # a log line at every evaluation step gives its training seconds; no grids; one checkpoint, at the
    # end (saving is not paused, so periodic saves would spend the budget)
    t.log_every, t.ckpt_every, t.sample_every, t.keep_last = settings.eval_every, 10**9, 0, 1
    t.seed = seed
    sampler, steps = EVAL_SAMPLERS[objective_family(cfg.objective.kind)]
    cfg.sample.sampler, cfg.sample.num_sampling_steps = sampler, steps  # PeriodicEvaluator samples with these
    cfg.sample.cfg_scale, cfg.sample.seed, cfg.sample.timestep_spacing = settings.eval_cfg, 0, "uniform"
    cfg.run = RunConfig(results_dir=str(Path(settings.out) / "runs" / dataset / variant), run_name=f"seed{seed}",
                        tensorboard=False)
    cfg = apply_overrides(cfg, settings.extra_set)
    cfg.validate()
    return cfg


def own_sampling(variant: str, dataset: str, recommended_set: dict[str, str]) -> dict[str, Any]:
    """The sample section the variant's recipe itself would use (recorded beside the eval protocol)."""
    from ditkit.config import apply_overrides
    from ditkit.recipes import get_recipe

    v = VARIANTS[variant]
    paper, recommended = RECIPES[dataset]
    cfg = apply_overrides(get_recipe(recommended if v.base == "recommended" else paper),
                          {**v.overrides, **recommended_set} if v.base == "recommended" else v.overrides)
    s = cfg.sample
    return {"sampler": s.sampler, "num_sampling_steps": s.num_sampling_steps, "cfg_scale": s.cfg_scale}


def run_dir_of(cfg: Any) -> Path:
    return Path(cfg.run.results_dir) / cfg.run.run_name


# ---- workers (subprocesses) ----------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_json(path: Path, payload: Any) -> None:
    """Through a temp file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def train_worker(spec: dict[str, Any]) -> None:
    """One run: train to the budget (resuming a checkpoint a Ctrl-C left, restarting a run killed
    before any), score the final EMA weights with the in-training protocol, write ``final.json``
    (its raw weights are scored after, by ``raw_worker``)."""
    from ditkit.config import Config
    from ditkit.data import load_dataset
    from ditkit.eval.model_eval import PeriodicEvaluator
    from ditkit.models.dit import forward_macs
    from ditkit.pipelines.image import ImagePipeline
    from ditkit.train.checkpoint import latest_checkpoint
    from ditkit.train.loop import NonFiniteLossError, train

    cfg = Config.from_dict(spec["config"])
    run_dir = run_dir_of(cfg)
    resume = None
    if run_dir.exists():
        if latest_checkpoint(run_dir) is not None:
            resume = run_dir
        else:  # killed before its only checkpoint: start again
            shutil.rmtree(run_dir)
    t0 = time.time()
    try:
        result = train(cfg, resume=resume, log=_log)
    except NonFiniteLossError as err:  # a diverged run is a result ("not reached"), not a crash of the benchmark
        _write_json(run_dir / FINAL_FILE, {
            "dataset": spec["dataset"], "variant": spec["variant"], "seed": spec["seed"], "run_dir": str(run_dir),
            "steps": None, "train_s": None, "stop_reason": "diverged", "error": str(err), "final": {},
            "wall_s": round(time.time() - t0, 1), "global_batch_size": cfg.train.global_batch_size,
        })
        _log(f"{spec['dataset']}/{spec['variant']}/seed{spec['seed']}: diverged: {err}")
        return
    wall_s = time.time() - t0
    pipe = ImagePipeline.from_checkpoint(result.run_dir, device=cfg.train.device, precision=cfg.train.precision)
    evaluator = PeriodicEvaluator(pipe.cfg, load_dataset(pipe.cfg.data), device=pipe.device, dtype=pipe.dtype, log=_log)
    final = evaluator(pipe.model)
    try:
        macs = forward_macs(pipe.model)
    except AttributeError:  # not a DiT: no analytic count
        macs = None
    batch = cfg.train.global_batch_size
    record = {
        "dataset": spec["dataset"], "variant": spec["variant"], "seed": spec["seed"], "run_dir": str(result.run_dir),
        "steps": result.step, "train_s": result.train_s, "stop_reason": result.stop_reason, "wall_s": round(wall_s, 1),
        "forward_macs_per_image": macs, "global_batch_size": batch,
        "train_flops": None if macs is None else training_flops(result.step, macs, batch),
        "final": final, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
    }
    _write_json(run_dir / FINAL_FILE, record)
    _log(f"{spec['dataset']}/{spec['variant']}/seed{spec['seed']}: {result.step} steps in {result.train_s:.0f} s, "
         f"final FD {final.get('fd_classifier', math.nan):.2f}, accuracy {final.get('conditional_accuracy', math.nan):.3f}")


def raw_worker(spec: dict[str, Any]) -> None:
    """Add ``final_raw`` to a finished run's ``final.json``: the final checkpoint's raw weights scored
    with the in-training protocol (what an option does to the network itself, whatever a slow EMA
    hides); ``spec["out"]`` marks it done."""
    from ditkit.data import load_dataset
    from ditkit.eval.model_eval import PeriodicEvaluator
    from ditkit.pipelines.image import ImagePipeline

    final_path = Path(spec["run_dir"]) / FINAL_FILE
    record = json.loads(final_path.read_text())
    recorded = json.loads((Path(spec["run_dir"]) / "config.json").read_text())["train"]  # as the run trained
    pipe = ImagePipeline.from_checkpoint(spec["run_dir"], device=recorded["device"], precision=recorded["precision"],
                                         use_ema=False)
    evaluator = PeriodicEvaluator(pipe.cfg, load_dataset(pipe.cfg.data), device=pipe.device, dtype=pipe.dtype, log=_log)
    record["final_raw"] = evaluator(pipe.model)
    _write_json(final_path, record)
    _write_json(Path(spec["out"]), {"run_dir": spec["run_dir"], "final_raw": record["final_raw"]})


def sampling_worker(spec: dict[str, Any]) -> None:
    """FD, accuracy and images/s of one sampler at each step count, on one checkpoint."""
    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.pipelines.image import ImagePipeline

    pipe = ImagePipeline.from_checkpoint(spec["checkpoint"], device=spec["device"], precision=spec["precision"])
    evaluator = build_evaluator(pipe.cfg, device=pipe.device)
    # one small call first, so one-time costs (kernels, allocator) stay out of the timing
    pipe(class_labels=[0, 1], num_samples=2, sampler=spec["sampler"], num_inference_steps=2,
         guidance_scale=spec["cfg_scale"], seed=0, allow_untrained_uncond=True)
    rows = []
    for steps in spec["steps"]:
        res = evaluate_generator(pipe, evaluator, spec["num_samples"], sampler=spec["sampler"], num_sampling_steps=steps,
                                 cfg_scale=spec["cfg_scale"], seed=spec["seed"])
        seconds = res["sampling"]["sampling_seconds"]
        metrics = res["metrics"]
        rows.append({"sampler": spec["sampler"], "steps": steps, "fd_classifier": metrics["fd_classifier"],
                     "conditional_accuracy": metrics.get("conditional_accuracy"), "sampling_seconds": seconds,
                     "images_per_sec": spec["num_samples"] / seconds if seconds else None})
        _log(f"{spec['sampler']} {steps} steps: FD {metrics['fd_classifier']:.2f}, "
             f"{rows[-1]['images_per_sec'] or 0:.1f} images/s")
    _write_json(Path(spec["out"]), {**{k: spec[k] for k in ("checkpoint", "sampler", "num_samples", "cfg_scale", "seed")},
                                    "rows": rows})


# ---- running jobs ----------------------------------------------------------------------------------


@dataclass
class Task:
    """A worker subprocess: ``spec`` is written to ``spec_path``; ``done`` exists once it finished."""

    name: str
    kind: str  # "train" | "raw" | "sampling"
    spec: dict[str, Any]
    spec_path: Path
    done: Path
    log_path: Path


def run_tasks(tasks: Sequence[Task], jobs: int, threads: int, log: Callable[[str], None] = _log) -> dict[str, int]:
    """Run the tasks not done yet, up to ``jobs`` at a time, each ``python THIS --worker SPEC`` with
    ``OMP_NUM_THREADS=threads``; its output goes to ``log_path``. Returns name -> exit code (0 for
    tasks already done). A failed task is reported and the others go on."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    codes: dict[str, int] = {}
    pending = []
    for task in tasks:
        if task.done.exists():
            log(f"skip {task.name}: done ({task.done})")
            codes[task.name] = 0
        else:
            pending.append(task)
    running: list[tuple[Task, subprocess.Popen, float, Any]] = []
    total, started = len(pending), 0
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                task = pending.pop(0)
                _write_json(task.spec_path, task.spec)
                task.log_path.parent.mkdir(parents=True, exist_ok=True)
                out = open(task.log_path, "a")
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(task.spec_path)],
                                        stdout=out, stderr=subprocess.STDOUT, env=env)
                started += 1
                log(f"[{started}/{total}] start {task.name} (log {task.log_path})")
                running.append((task, proc, time.time(), out))
            time.sleep(0.5)
            for item in list(running):
                task, proc, t0, out = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                out.close()
                codes[task.name] = proc.returncode
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {task.log_path})"
                log(f"{task.name}: {state} after {time.time() - t0:.0f} s")
    except KeyboardInterrupt:  # the children got the Ctrl-C too: they save a checkpoint and stop
        for _, proc, _, out in running:
            proc.wait()
            out.close()
        raise
    return codes


# ---- collecting and reporting ----------------------------------------------------------------------


def collect(out: Path, datasets: Sequence[str], variants: Sequence[str], seeds: int) -> list[dict[str, Any]]:
    """Every finished run under ``out`` of these datasets / variants / seeds (the paper runs always,
    when present: they set the target), with its curve (``flops`` added) and the final point."""
    runs = []
    wanted = list(dict.fromkeys(["paper", *variants]))
    for dataset in datasets:
        for variant in wanted:
            for seed in range(seeds):
                run_dir = out / "runs" / dataset / variant / f"seed{seed}"
                if not (run_dir / FINAL_FILE).is_file():
                    continue
                record = json.loads((run_dir / FINAL_FILE).read_text())
                metrics = run_dir / "metrics.jsonl"
                curve = parse_metrics(metrics.read_text().splitlines() if metrics.is_file() else [])
                if "fd_classifier" in record["final"]:  # not a diverged run: its final point, at the budget
                    final_point = {"step": record["steps"], "train_s": record["train_s"],
                                   "fd_classifier": record["final"]["fd_classifier"],
                                   "conditional_accuracy": record["final"].get("conditional_accuracy", math.nan)}
                    curve = [p for p in curve if p["step"] < final_point["step"]] + [final_point]
                macs = record.get("forward_macs_per_image")
                for point in curve:
                    point["flops"] = None if macs is None else training_flops(point["step"], macs, record["global_batch_size"])
                runs.append({**record, "curve": curve})
    return runs


def plot_curves(runs: Sequence[dict[str, Any]], dataset: str, target_fd: Optional[float], path: Path, budget_s: float) -> None:
    """FD vs training seconds, FD vs training FLOPs and accuracy vs seconds: one colour per variant,
    one line per seed, the paper's final FD dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colours = plt.get_cmap("tab10")
    variants = list(dict.fromkeys(r["variant"] for r in runs if r["dataset"] == dataset))
    for i, variant in enumerate(variants):
        for j, run in enumerate(r for r in runs if r["dataset"] == dataset and r["variant"] == variant):
            curve = run["curve"]
            style = dict(color=colours(i % 10), alpha=0.9 if j == 0 else 0.5, lw=1.8 if j == 0 else 1.0,
                         marker="o", ms=3, label=variant if j == 0 else None)
            axes[0].plot([p["train_s"] for p in curve], [p["fd_classifier"] for p in curve], **style)
            if all(p["flops"] is not None for p in curve):
                axes[1].plot([p["flops"] for p in curve], [p["fd_classifier"] for p in curve], **style)
            axes[2].plot([p["train_s"] for p in curve], [p["conditional_accuracy"] for p in curve], **style)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("FD (classifier features), EMA samples")
        if target_fd is not None:
            ax.axhline(target_fd, color="k", ls="--", lw=1, label="paper recipe's final FD")
    axes[0].set_xlabel("training seconds")
    axes[1].set_xlabel("training FLOPs (3 x forward MACs x 2 x batch x steps)")
    axes[1].set_xscale("log")
    axes[2].set_xlabel("training seconds")
    axes[2].set_ylabel("conditional accuracy")
    for ax in (axes[0], axes[2]):
        ax.axvline(budget_s, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"time to quality on {dataset} (median over seeds in the table; thin lines: other seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------------


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    from ditkit.config import parse_set_option

    return dict(parse_set_option(item) for item in items)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="10m", help="training seconds per run (train.time_budget): 90s, 10m, ...")
    parser.add_argument("--datasets", default="digits", help=f"comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--variants", default="all", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per variant (0..N-1); medians are quoted")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between evaluations (train.eval_every)")
    parser.add_argument("--eval-samples", type=int, default=200, help="samples per evaluation (train.eval_samples)")
    parser.add_argument("--eval-cfg", type=float, default=1.5,
                        help="guidance of every evaluation (1.5: the DiT paper's FID-50K setting)")
    parser.add_argument("--jobs", type=int, default=2, help="runs training at a time (one subprocess each)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each job")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--recommended-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides of the recommended variant (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides of every run, applied last (e.g. model.name=DiT-T/4 for a smoke run)")
    parser.add_argument("--sampling-samples", type=int, default=500, help="samples per point of the sampling part")
    parser.add_argument("--sampling-steps", default=None,
                        help="comma-separated step counts for every sampler (default: SAMPLING_STEPS per sampler)")
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling part")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        spec = json.loads(Path(args.worker).read_text())
        {"train": train_worker, "raw": raw_worker, "sampling": sampling_worker}[spec["kind"]](spec)
        return 0

    import torch

    from ditkit.errors import ConfigError
    from ditkit.train.hooks import parse_duration

    sys.path.insert(0, str(HERE))
    from common import machine

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.seeds < 1 or args.eval_every < 1 or args.jobs < 1:
        raise ConfigError("--seeds, --eval-every and --jobs must be >= 1")
    budget_s = parse_duration(args.budget)
    settings = Settings(budget=args.budget, eval_every=args.eval_every, eval_samples=args.eval_samples,
                        eval_cfg=args.eval_cfg, out=out, recommended_set=_parse_sets(args.recommended_set),
                        extra_set=_parse_sets(args.set))
    t_start = time.time()

    # configs first: a bad name or value fails here, before any training
    tasks = []
    for dataset in datasets:
        for variant in variants:
            for seed in range(args.seeds):
                cfg = variant_config(variant, dataset, seed, settings)
                run_dir = run_dir_of(cfg)
                name = f"{dataset}/{variant}/seed{seed}"
                tasks.append(Task(name, "train", {"kind": "train", "dataset": dataset, "variant": variant, "seed": seed,
                                                  "config": cfg.to_dict()},
                                  out / "specs" / f"{dataset}-{variant}-seed{seed}.json", run_dir / FINAL_FILE,
                                  out / "logs" / f"{dataset}-{variant}-seed{seed}.log"))
    # the feature classifier and reference statistics of each dataset, built once here (cached on
    # disk) rather than by several jobs at once
    from ditkit.eval.model_eval import build_evaluator

    for dataset in datasets:
        t0 = time.time()
        build_evaluator(variant_config(variants[0], dataset, 0, settings))
        _log(f"{dataset}: evaluation classifier ready in {time.time() - t0:.0f} s")

    codes = run_tasks(tasks, args.jobs, args.threads)
    train_wall_s = time.time() - t_start
    # the raw weights of every finished run of these datasets (the paper runs always) not scored
    # yet; a diverged run has nothing to score
    raw_tasks = []
    for dataset in datasets:
        for variant in dict.fromkeys(["paper", *variants]):
            for seed in range(args.seeds):
                run_dir, name = out / "runs" / dataset / variant / f"seed{seed}", f"{dataset}-{variant}-seed{seed}"
                record = json.loads((run_dir / FINAL_FILE).read_text()) if (run_dir / FINAL_FILE).is_file() else {}
                if record.get("steps") is not None and "final_raw" not in record:
                    raw_tasks.append(Task(f"{dataset}/{variant}/seed{seed}/raw", "raw",
                                          {"kind": "raw", "run_dir": str(run_dir), "out": str(run_dir / "final_raw.json")},
                                          out / "specs" / f"{name}-raw.json", run_dir / "final_raw.json",
                                          out / "logs" / f"{name}-raw.log"))
    codes.update(run_tasks(raw_tasks, args.jobs, args.threads))

    # the sampling part, on the recommended run (seed 0) of each dataset
    sampling_specs: dict[str, list[Task]] = {}
    if not args.no_sampling and "recommended" in variants:
        steps_override = None if args.sampling_steps is None else [int(s) for s in args.sampling_steps.split(",") if s.strip()]
        for dataset in datasets:
            cfg = variant_config("recommended", dataset, 0, settings)
            if not (run_dir_of(cfg) / FINAL_FILE).is_file():
                _log(f"{dataset}: no finished recommended run, no sampling part")
                continue
            family = objective_family(cfg.objective.kind)
            sampling_specs[dataset] = []
            for sampler, steps in SAMPLING_STEPS[family].items():
                path = out / "sampling" / dataset / f"{sampler}.json"
                spec = {"kind": "sampling", "checkpoint": str(run_dir_of(cfg)), "sampler": sampler,
                        "steps": list(steps_override or steps), "num_samples": args.sampling_samples,
                        "cfg_scale": args.eval_cfg, "seed": 1000, "device": cfg.train.device,
                        "precision": cfg.train.precision, "out": str(path)}
                if path.is_file():  # done with other settings: do it again
                    old = json.loads(path.read_text())
                    if old.get("num_samples") != spec["num_samples"] or [r["steps"] for r in old["rows"]] != spec["steps"] \
                            or old.get("cfg_scale") != spec["cfg_scale"]:
                        path.unlink()
                sampling_specs[dataset].append(Task(f"{dataset}/sampling/{sampler}", "sampling", spec,
                                                    out / "specs" / f"{dataset}-sampling-{sampler}.json", path,
                                                    out / "logs" / f"{dataset}-sampling-{sampler}.log"))
        codes.update(run_tasks([t for ts in sampling_specs.values() for t in ts], args.jobs, args.threads))

    # report
    runs = collect(out, datasets, variants, args.seeds)
    summary = summarise(runs, budget_s)
    table = format_table(summary, budget_s)
    sampling: dict[str, Any] = {}
    for dataset, ts in sampling_specs.items():
        rows = [r for t in ts if t.done.is_file() for r in json.loads(t.done.read_text())["rows"]]
        verdict = fewest_steps(rows)
        sampling[dataset] = {"rows": rows, "fewest_steps_within_10pct": verdict}
        table += "\n" + format_sampling_table(dataset, verdict, args.sampling_samples, args.eval_cfg)
    for dataset in datasets:
        if any(r["dataset"] == dataset for r in runs):
            plot_curves(runs, dataset, summary.get(dataset, {}).get("target_fd"), out / f"curves_{dataset}.png", budget_s)
    results = {
        "command": " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/time_to_quality.py", *(argv or sys.argv[1:])]),
        "settings": {"budget": args.budget, "budget_s": budget_s, "eval_every": args.eval_every,
                     "eval_samples": args.eval_samples, "eval_cfg": args.eval_cfg,
                     "eval_samplers": {k: list(v) for k, v in EVAL_SAMPLERS.items()}, "seeds": args.seeds,
                     "datasets": datasets, "variants": variants, "jobs": args.jobs, "threads": args.threads,
                     "recommended_set": settings.recommended_set, "set": settings.extra_set,
                     "sampling_samples": args.sampling_samples},
        "machine": machine(),
        "wall_s": {"training": round(train_wall_s), "total": round(time.time() - t_start)},
        "variants": {name: {"summary": VARIANTS[name].summary, "base": VARIANTS[name].base,
                            "overrides": VARIANTS[name].overrides if VARIANTS[name].base == "paper"
                            else {**VARIANTS[name].overrides, **settings.recommended_set},
                            "recipes": {d: RECIPES[d][0 if VARIANTS[name].base == "paper" else 1] for d in datasets},
                            "own_sampling": {d: own_sampling(name, d, settings.recommended_set) for d in datasets}}
                     for name in dict.fromkeys(["paper", *variants])},
        "failed": {name: code for name, code in codes.items() if code != 0},
        "summary": summary,
        "suggested": suggest(summary),
        "sampling": sampling,
        "runs": runs,
    }
    _write_json(out / "results.json", results)
    (out / "table.md").write_text(table)
    print(table)
    if results["suggested"]:
        for dataset, names in results["suggested"].items():
            print(f"{dataset}: options that reached the paper's final FD sooner and ended lower: {', '.join(names) or 'none'}")
    print(f"results: {out / 'results.json'}, {out / 'table.md'}, curves_*.png; {time.time() - t_start:.0f} s in all")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

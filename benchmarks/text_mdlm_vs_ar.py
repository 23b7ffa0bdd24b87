"""Masked diffusion (MDLM) vs an autoregressive baseline on the same TextDiT backbone, on this CPU.

Every model here is trained by the shared trainer (``ditkit.train.loop.train``) from a named recipe,
so a run of this script is the same as ``ditkit train`` runs (results in ``--work-dir``).

Part 1 (likelihood): recipe ``shakespeare_char`` on a character-level corpus (tinyshakespeare -- a
benchmark file given by path, not a dependency), ``objective.kind`` masked and autoregressive, two
seeds each, with the same model size, sequence length, batch and steps (the same training FLOPs:
neither model is time-conditioned, only the attention mask differs). The trainer evaluates the EMA
model's validation bits per character every ``--eval-every`` steps (MDLM: the NELBO bound on the
first ``--eval-seqs`` chunks, AR: the exact NLL) into ``metrics.jsonl`` -- the curves -- and keeps
the checkpoint of the best evaluation (``train.keep_best``, ``RUN/best.json``). At that checkpoint
both are re-evaluated on the whole validation split (MDLM with the standard error of
``--final-passes`` stratified passes, and the number-of-masks estimator as a cross-check); samples
of both. One more AR run (the first seed, stopped at ``--early-steps``, evaluated every
``--early-eval-every`` steps; otherwise the same run) says after how many steps AR reaches the bound
MDLM ends at: the ratio of steps is the compute MDLM needs for the same bits per character.

Part 2 (synthetic language): recipe ``text_sums`` (a 2 x 64 TextDiT) with masked and autoregressive
objectives on ``a+b=c`` sums and balanced brackets; the fraction of valid generated documents and
the sampling throughput (generated tokens/s, best of ``--repeats``) for several MDLM step counts, plain
and cached ancestral sampler, and for AR, drawing ``--syn-samples`` as one batch and ``--syn-single``
one at a time. Throughput is measured after all training has finished.

Training runs go ``--jobs`` at a time, each in its own process with ``--threads`` torch threads. A run
directory already in ``--work-dir`` with the same config is reused (finished) or resumed (unfinished).

    OMP_NUM_THREADS=1 python benchmarks/text_mdlm_vs_ar.py --data ../shared/data/tinyshakespeare.txt \\
        --jobs 2 --out docs/results/text_mdlm_vs_ar.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ditkit.checkpoint_io import checkpoint_facts, latest_checkpoint
from ditkit.config import Config, ConfigError, apply_overrides, load_config, parse_set_option
from ditkit.data.text import is_balanced, is_valid_sum
from ditkit.data.text_loader import load_text_data
from ditkit.eval.text import distinct_ngrams, fraction_valid, masked_diffusion_bound, sampling_throughput, text_likelihood
from ditkit.models.dit import count_params
from ditkit.models.text_dit import text_forward_macs
from ditkit.recipes import get_recipe
from ditkit.samplers.autoregressive import autoregressive
from ditkit.samplers.masked import ancestral, canvas
from ditkit.builders import build_model
from ditkit.pipelines.text import TextPipeline
from ditkit.train.loop import read_best, train

KINDS = {"mdlm": "masked", "ar": "autoregressive"}  # short name in tables -> objective.kind
SYNTHETIC_CHECKS = {"synthetic-sums": is_valid_sum, "synthetic-brackets": is_balanced}


# ---- runs through the shared trainer -------------------------------------------------------------


def likelihood_config(args: argparse.Namespace, kind: str, seed: int) -> Config:
    """Recipe ``shakespeare_char`` for one objective and seed; ``--set`` overrides apply to every run."""
    overrides = {
        "objective.kind": KINDS[kind], "data.dataset": str(args.data), "train.seed": seed,
        "train.max_steps": args.steps, "train.ckpt_every": args.steps, "train.eval_every": args.eval_every,
        "train.eval_samples": args.eval_seqs, "run.results_dir": str(args.work_dir), "run.run_name": f"{kind}-seed{seed}",
        **dict(parse_set_option(item) for item in args.set),
    }
    return apply_overrides(get_recipe("shakespeare_char"), overrides)


def synthetic_config(args: argparse.Namespace, corpus: str, kind: str) -> Config:
    """Recipe ``text_sums`` on ``corpus`` for one objective; the validation bpc every quarter run."""
    overrides = {
        "objective.kind": KINDS[kind], "data.dataset": corpus, "data.seq_len": args.syn_seq_len,
        "data.synthetic_docs": args.syn_docs, "train.max_steps": args.syn_steps, "train.ckpt_every": args.syn_steps,
        "train.eval_every": max(1, args.syn_steps // 4), "train.eval_samples": 128,
        "run.results_dir": str(args.work_dir), "run.run_name": f"{corpus}-{kind}",
    }
    return apply_overrides(get_recipe("text_sums"), overrides)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.results_dir) / str(cfg.run.run_name)


def train_or_reuse(cfg: Config, threads: int, stop_at_step: Optional[int] = None) -> tuple[Path, str]:
    """Train ``cfg`` with the shared trainer up to ``stop_at_step`` (default: the whole run), resuming
    an unfinished run of the same config or reusing a finished one. Runs in a worker process; returns
    the run directory and what was done (``trained``, ``resumed`` or ``reused``)."""
    torch.set_num_threads(threads)
    run_dir = run_dir_of(cfg)
    name, until = run_dir.name, stop_at_step or cfg.train.max_steps

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    latest = latest_checkpoint(run_dir)
    if latest is None:
        train(cfg, stop_at_step=stop_at_step, log=log)
        return run_dir, "trained"
    saved = load_config(run_dir)
    wanted = Config.from_dict(cfg.to_dict())
    wanted.data.vocab_size, wanted.data.num_classes = saved.data.vocab_size, saved.data.num_classes  # set by training
    wanted.train.compile = saved.train.compile  # how a step runs (compiled or eager), not what it computes
    if saved != wanted:
        raise ConfigError(f"{run_dir} holds a run with another config: delete it or pick another --work-dir")
    if checkpoint_facts(latest)["step"] < until:
        train(cfg, resume=run_dir, stop_at_step=stop_at_step, log=log)
        return run_dir, "resumed"
    log(f"reusing the finished run {run_dir}")
    return run_dir, "reused"


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """The validation evaluations the trainer wrote into ``metrics.jsonl`` (bpc by step, EMA weights)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [
        {"step": r["step"], "bpc": r["val_bits_per_char"], "stderr": r["val_bits_per_char_stderr"],
         "elapsed_s": _elapsed_at(rows, r["step"])}
        for r in rows if "val_bits_per_char" in r
    ]


def _elapsed_at(rows: list[dict[str, Any]], step: int) -> Optional[float]:
    """Wall time since the run started at the loss line of ``step`` (None between log lines)."""
    times = [r["elapsed_s"] for r in rows if "loss" in r and r["step"] == step]
    return times[-1] if times else None


def training_speed(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in rows if "loss" in r]
    return {"wall_s": losses[-1]["elapsed_s"],
            "steps_per_sec_median": sorted(r["steps_per_sec"] for r in losses)[len(losses) // 2],
            "final_train_loss": losses[-1]["loss"]}


# ---- part 1 ---------------------------------------------------------------------------------------


def likelihood_job(cfg: Config, threads: int, final_passes: int, num_samples: int) -> dict[str, Any]:
    """Train (or reuse) one run, then score its best checkpoint on the whole validation split."""
    run_dir, how = train_or_reuse(cfg, threads)
    best = read_best(run_dir)
    if best is None:
        raise SystemExit(f"{run_dir} has no best checkpoint: the benchmark needs train.keep_best=true and eval_every")
    ckpt = run_dir / "checkpoints" / best["checkpoint"]
    pipe = TextPipeline.from_checkpoint(ckpt, device="cpu")  # the EMA weights, as the trainer evaluated them
    model, cfg, tokenizer, objective = pipe.model, pipe.cfg, pipe.tokenizer, pipe.objective
    data = load_text_data(cfg.data, tokenizer)
    val, chars = data.text.val, data.text.val_chars
    seed, masked = cfg.train.seed, cfg.objective.kind == "masked"
    t0 = time.perf_counter()
    full = text_likelihood(objective, model, val, num_chars=chars, num_passes=final_passes,
                           generator=torch.Generator().manual_seed(10_000 + seed))
    run: dict[str, Any] = {
        "kind": "mdlm" if masked else "ar", "seed": seed, "run_dir": str(run_dir), "training": how, "best": best,
        "curve": read_curve(run_dir), **training_speed(run_dir), "full_val": full.to_dict(),
        "full_val_seconds": time.perf_counter() - t0,
    }
    if masked:  # the number-of-masks form of the same bound: agreement checks the 1/t estimator
        run["full_val_count_form"] = masked_diffusion_bound(
            objective, model, val, num_chars=chars, num_passes=final_passes, estimator="count",
            generator=torch.Generator().manual_seed(20_000 + seed)).to_dict()
    t0 = time.perf_counter()  # MDLM: seq_len ancestral steps, cached (the model ignores t)
    out = pipe(num_samples=num_samples, seed=0)
    tokens, start = out.tokens, out.start
    run["sample_s"] = time.perf_counter() - t0
    run["samples"] = [tokenizer.decode(row[start:].tolist()) for row in tokens]
    run["distinct_4"] = distinct_ngrams(tokens[:, start:], 4)
    run["distinct_4_validation"] = distinct_ngrams(val[:num_samples], 4)
    return run


def early_config(args: argparse.Namespace, seed: int) -> Config:
    """The AR run of ``seed`` evaluated every ``--early-eval-every`` steps and stopped at ``--early-steps``
    (the same schedule, data order and weights as the full run up to there): its curve says after how
    many steps AR reaches the bound MDLM ends at."""
    cfg = likelihood_config(args, "ar", seed)
    cfg.train.eval_every, cfg.run.run_name = args.early_eval_every, f"ar-seed{seed}-early"
    return cfg


def early_job(cfg: Config, threads: int, stop_at_step: int) -> dict[str, Any]:
    run_dir, how = train_or_reuse(cfg, threads, stop_at_step)
    return {"seed": cfg.train.seed, "run_dir": str(run_dir), "training": how, "curve": read_curve(run_dir)}


def steps_to_match(early: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each MDLM run: the first AR step (early curve) whose validation bpc is at or below MDLM's
    best, on the same chunks with the same evaluator; the ratio of steps is the compute ratio."""
    out = []
    for r in runs:
        if r["kind"] != "mdlm":
            continue
        hit = next((c["step"] for c in early["curve"] if c["bpc"] <= r["best"]["value"]), None)
        out.append({"mdlm_seed": r["seed"], "mdlm_best_step": r["best"]["step"], "mdlm_best_subset_bpc": r["best"]["value"],
                    "ar_seed": early["seed"], "ar_step": hit,
                    "compute_ratio": r["best"]["step"] / hit if hit else None})
    return out


def corpus_facts(cfg: Config) -> dict[str, Any]:
    """Sizes of the corpus and model, training FLOPs per run, unigram entropy (the no-context floor)."""
    data = load_text_data(cfg.data)
    probe = Config.from_dict(cfg.to_dict())
    probe.data.vocab_size, probe.data.num_classes = data.tokenizer.vocab_size, 0
    model = build_model(probe)
    macs = text_forward_macs(model, cfg.data.seq_len)  # forward multiply-accumulates per sequence
    counts = torch.bincount(data.tokens.reshape(-1), minlength=data.tokenizer.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    b = cfg.train.global_batch_size
    return {
        "dataset": cfg.data.dataset, "vocab_size": data.tokenizer.vocab_size, "seq_len": cfg.data.seq_len,
        "num_train": len(data), "num_val": int(data.text.val.shape[0]), "val_overlaps_dropped": data.text.num_val_dropped,
        "params": count_params(model), "train_flops_per_step": 6 * macs * b,  # forward + backward ~ 3 x 2 FLOPs/MAC
        "train_flops_total": 6 * macs * b * cfg.train.max_steps, "unigram_bpc": float(-(p * p.log2()).sum()),
    }


# ---- part 2 ---------------------------------------------------------------------------------------


def synthetic_rows(
    run_dir: Path, num_samples: int, num_single: int, sampler_steps: list[int], repeats: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Validity and throughput of one trained synthetic run (the final EMA weights): ``num_samples``
    drawn as one batch, and the first ``num_single`` again one at a time (``tokens_per_s_batch1``).
    The sampler reuses the network output only when no token of the whole batch changed, so the cache
    pays off one sequence at a time; every sample has its own seed, so the tokens are the same."""
    pipe = TextPipeline.from_checkpoint(run_dir, device="cpu")
    model, cfg, tokenizer = pipe.model, pipe.cfg, pipe.tokenizer
    objective, L, corpus = pipe.objective, cfg.data.seq_len, cfg.data.dataset
    net = lambda x, t: model(x, t, None)  # noqa: E731  (unconditional)
    masked = cfg.objective.kind == "masked"

    def draw(steps: int, cache: bool, seeds: range) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in seeds]  # sample i: seed i, whatever the batch
        with torch.no_grad():
            if masked:
                return ancestral(objective.denoiser(net), canvas(L, objective.mask_id, len(seeds)), steps,
                                 mask_id=objective.mask_id, cache=cache, generator=gens)
            return autoregressive(objective.denoiser(net, L), torch.zeros(len(seeds), 0, dtype=torch.long), L, generator=gens)

    settings = [(s, c) for s in sampler_steps for c in (False, True)] if masked else [(L, False)]
    rows, out = [], None
    for steps, cache in settings:
        drawn: list[torch.Tensor] = []

        def draw_and_keep() -> torch.Tensor:
            drawn.append(draw(steps, cache, range(num_samples)))
            return drawn[-1]

        def one_at_a_time() -> torch.Tensor:
            return torch.cat([draw(steps, cache, range(i, i + 1)) for i in range(num_single)])

        timings = [sampling_throughput(draw_and_keep) for _ in range(repeats)]  # best of: the machine is shared
        single = [sampling_throughput(one_at_a_time) for _ in range(repeats)]
        out = drawn[-1]  # every repeat draws the same samples (seeded per sample)
        assert torch.equal(one_at_a_time(), out[:num_single]), "a sample must not depend on its batch"
        valid = fraction_valid(out, tokenizer, SYNTHETIC_CHECKS[corpus])
        row = {"sampler_steps": steps, "cache": cache, **valid,
               "tokens_per_s": max(t["tokens_per_s"] for t in timings),
               "tokens_per_s_batch1": max(t["tokens_per_s"] for t in single)}
        if corpus == "synthetic-sums":
            row["fraction_well_formed"] = fraction_valid(
                out, tokenizer, lambda s: re.fullmatch(r"\d+\+\d+=\d+", s) is not None)["fraction_valid"]
        rows.append(row)
        log(f"  {corpus} {'mdlm' if masked else 'ar':4s} steps {steps:3d} cache {cache!s:5s}: valid "
            f"{valid['fraction_valid']:.3f} of {int(valid['num_documents'])} docs, {row['tokens_per_s']:.0f} tokens/s "
            f"(one at a time {row['tokens_per_s_batch1']:.0f})")
    curve = read_curve(run_dir)
    return {"corpus": corpus, "kind": "mdlm" if masked else "ar", "train_steps": cfg.train.max_steps,
            **training_speed(run_dir), "final_val_bpc": curve[-1]["bpc"], "curve": curve, "rows": rows,
            "examples": [tokenizer.decode(r.tolist()) for r in out[:2]]}


# ---- summary --------------------------------------------------------------------------------------


def summarise(lik: Optional[dict[str, Any]], syn: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    """Print the tables (Markdown, ready for docs/text.md) and add the gaps to ``lik``."""
    if lik:
        by = {(r["kind"], r["seed"]): r for r in lik["runs"]}
        seeds = sorted({r["seed"] for r in lik["runs"]})
        log("\nbits per character on the whole validation split, each run at its best validation point (EMA)\n")
        log("| seed | MDLM bound (best step) | MDLM count form | AR exact (best step) | gap MDLM / AR - 1 |")
        log("|---:|---:|---:|---:|---:|")
        gaps = []
        for seed in seeds:
            m, a = by[("mdlm", seed)], by[("ar", seed)]
            mb, ab = m["full_val"]["bits_per_char"], a["full_val"]["bits_per_char"]
            gaps.append({"seed": seed, "mdlm_bpc": mb, "ar_bpc": ab, "gap": mb / ab - 1,
                         "mdlm_best_step": m["best"]["step"], "ar_best_step": a["best"]["step"]})
            log(f"| {seed} | {mb:.3f} ± {m['full_val']['stderr_bits_per_char']:.3f} ({m['best']['step']}) | "
                f"{m['full_val_count_form']['bits_per_char']:.3f} ± {m['full_val_count_form']['stderr_bits_per_char']:.3f} | "
                f"{ab:.3f} ({a['best']['step']}) | {100 * gaps[-1]['gap']:.1f}% |")
        lik["gaps"] = gaps
        lik["gap_mean"] = sum(g["gap"] for g in gaps) / len(gaps)
        log(f"\nmean gap: {100 * lik['gap_mean']:.1f}% (target <= 15%)")
        for m in lik.get("ar_steps_to_match_mdlm", []):
            where = (f"at step {m['ar_step']}: MDLM spent {m['compute_ratio']:.0f}x the training compute" if m["ar_step"]
                     else "not within the early run")
            log(f"AR seed {m['ar_seed']} reaches MDLM seed {m['mdlm_seed']}'s best bound ({m['mdlm_best_subset_bpc']:.3f} "
                f"at step {m['mdlm_best_step']}) {where}")
        cols = [(k, s) for k in ("mdlm", "ar") for s in seeds]
        log("\nvalidation bpc by step (first eval-seqs chunks; MDLM bound, AR exact)\n")
        log("| step | " + " | ".join(f"{k.upper()} seed {s}" for k, s in cols) + " |")
        log("|---:|" + "---:|" * len(cols))
        steps = sorted({c["step"] for r in lik["runs"] for c in r["curve"]})
        table = {(r["kind"], r["seed"], c["step"]): c["bpc"] for r in lik["runs"] for c in r["curve"]}
        for step in steps:
            log(f"| {step} | " + " | ".join(f"{table.get((k, s, step), float('nan')):.3f}" for k, s in cols) + " |")
        for r in lik["runs"]:
            log(f"\n{r['kind']} seed {r['seed']}: {r['wall_s']:.0f} s of training ({r['steps_per_sec_median']:.2f} steps/s), "
                f"distinct-4 {r['distinct_4']:.3f} (validation {r['distinct_4_validation']:.3f})")
            for s in r["samples"][:2]:
                log("  | " + s.replace("\n", "\n  | "))
    if syn:
        log("\nsynthetic language: valid documents and sampling throughput (best of repeats)\n")
        log("| corpus | model | sampler steps | valid | well-formed | tokens/s, batch: plain | cached "
            "| tokens/s, one at a time: plain | cached |")
        log("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for entry in syn:
            rows = {(r["sampler_steps"], r["cache"]): r for r in entry["rows"]}
            for steps in sorted({r["sampler_steps"] for r in entry["rows"]}):
                plain, cached = rows[(steps, False)], rows.get((steps, True))
                wf = f"{plain['fraction_well_formed']:.3f}" if "fraction_well_formed" in plain else "-"
                c, c1 = (f"{cached['tokens_per_s']:.0f}", f"{cached['tokens_per_s_batch1']:.0f}") if cached else ("-", "-")
                log(f"| {entry['corpus']} | {entry['kind'].upper()} | {steps} | {plain['fraction_valid']:.3f} | {wf} | "
                    f"{plain['tokens_per_s']:.0f} | {c} | {plain['tokens_per_s_batch1']:.0f} | {c1} |")


# ---- main -----------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt", help="text file for part 1")
    p.add_argument("--out", default="text_mdlm_vs_ar.json")
    p.add_argument("--work-dir", default="results/text_mdlm_vs_ar", help="run directories of every trained model")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--steps", type=int, default=get_recipe("shakespeare_char").train.max_steps)
    p.add_argument("--eval-every", type=int, default=get_recipe("shakespeare_char").train.eval_every)
    p.add_argument("--eval-seqs", type=int, default=get_recipe("shakespeare_char").train.eval_samples,
                   help="validation chunks for the curves")
    p.add_argument("--early-steps", type=int, default=500, help="AR steps of the finely evaluated early run (0: none)")
    p.add_argument("--early-eval-every", type=int, default=25)
    p.add_argument("--final-passes", type=int, default=4, help="MDLM time samples per chunk on the whole split")
    p.add_argument("--num-samples", type=int, default=8, help="samples per model in part 1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the shakespeare_char recipe for every part-1 run, e.g. --set train.lr=1e-3")
    p.add_argument("--skip-likelihood", action="store_true")
    p.add_argument("--synthetic", nargs="*", default=list(SYNTHETIC_CHECKS), choices=list(SYNTHETIC_CHECKS))
    p.add_argument("--syn-steps", type=int, default=2000)
    p.add_argument("--syn-seq-len", type=int, default=32)
    p.add_argument("--syn-docs", type=int, default=8000)
    p.add_argument("--syn-samples", type=int, default=64)
    p.add_argument("--syn-single", type=int, default=16, help="samples also drawn one at a time (throughput)")
    p.add_argument("--syn-sampler-steps", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each sampling setting")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_likelihood and not Path(args.data).is_file():
        p.error(f"--data {args.data} not found: give the path of a text file (e.g. tinyshakespeare.txt)")

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.time()
    lik_cfgs = [] if args.skip_likelihood else [likelihood_config(args, k, s) for s in args.seeds for k in KINDS]
    early_cfgs = [early_config(args, args.seeds[0])] if lik_cfgs and args.early_steps else []
    syn_cfgs = [synthetic_config(args, c, k) for c in args.synthetic for k in KINDS]
    lik = corpus_facts(lik_cfgs[0]) if lik_cfgs else None
    if lik:
        log(f"{lik['dataset']}: vocab {lik['vocab_size']}, {lik['num_train']} train / {lik['num_val']} val chunks of "
            f"{lik['seq_len']}; {lik['params'] / 1e6:.2f}M params, {lik['train_flops_total'] / 1e12:.1f} TFLOP of "
            f"training per run; unigram entropy {lik['unigram_bpc']:.3f} bpc")
    jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (likelihood_job, (c, args.threads, args.final_passes, args.num_samples)) for c in lik_cfgs
    ] + [(early_job, (c, args.threads, args.early_steps)) for c in early_cfgs] + [
        (train_or_reuse, (c, args.threads)) for c in syn_cfgs
    ]
    if args.jobs > 1:  # spawn: a clean interpreter per worker (no forked torch thread pools)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = [f.result() for f in [pool.submit(fn, *a) for fn, a in jobs]]
    else:
        results = [fn(*a) for fn, a in jobs]
    n_lik, n_early = len(lik_cfgs), len(early_cfgs)
    if lik:
        lik["runs"] = results[:n_lik]
        if early_cfgs:
            lik["early_ar"] = results[n_lik]
            lik["ar_steps_to_match_mdlm"] = steps_to_match(results[n_lik], lik["runs"])
    syn = []
    for run_dir, how in results[n_lik + n_early:]:
        syn.append({**synthetic_rows(run_dir, args.syn_samples, args.syn_single, args.syn_sampler_steps, args.repeats, log),
                    "training": how})
    summarise(lik, syn, log)
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv), "threads_per_run": args.threads, "jobs": args.jobs,
        "wall_s": time.time() - start, "likelihood": lik, "synthetic": syn,
        "recipe": lik_cfgs[0].to_dict() if lik_cfgs else None,
        "settings": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    log(f"\nwrote {args.out} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

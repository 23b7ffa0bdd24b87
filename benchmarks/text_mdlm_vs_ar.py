"""Masked diffusion (MDLM) vs an autoregressive baseline on the same TextDiT backbone, on this CPU.

Part 1 (likelihood): character-level text (tinyshakespeare by default -- a benchmark corpus given by
path, not a dependency), the same model size, sequence length, batch and number of steps for both
objectives (so the same training FLOPs: neither model is time-conditioned, the only difference is
the attention mask). Validation bits per character over training for each seed: the MDLM NELBO
bound (with its Monte-Carlo standard error) and the AR exact NLL; at each run's best validation
point both are re-evaluated on the whole validation split (MDLM also with the number-of-masks
estimator as a cross-check). Samples of both.

Part 2 (synthetic language): MDLM and AR trained on ``a+b=c`` sums (and balanced brackets); the
fraction of valid generated documents and the sampling throughput for several MDLM step counts
(plain and cached ancestral sampler) and for AR.

Prints tables and writes JSON. Training is a short plain loop (AdamW, warmup + cosine, clip 1.0);
the shared trainer will replace it once text is integrated there.

    python benchmarks/text_mdlm_vs_ar.py --data ../shared/data/tinyshakespeare.txt --out text_bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from ditkit.data.text import build_text_dataset, is_balanced, is_valid_sum
from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.masked import MaskedDiffusion
from ditkit.eval.text import autoregressive_nll, distinct_ngrams, fraction_valid, masked_diffusion_bound, sampling_throughput
from ditkit.models.dit import count_params
from ditkit.models.text_dit import build_text_dit, text_forward_macs
from ditkit.samplers.autoregressive import autoregressive
from ditkit.samplers.masked import ancestral, canvas


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(kind, objective, model, tokens, chars, passes, seed, estimator="time"):
    if kind == "mdlm":
        return masked_diffusion_bound(
            objective, model, tokens, num_chars=chars, num_passes=passes, estimator=estimator,
            generator=torch.Generator().manual_seed(10_000 + seed),
        )
    return autoregressive_nll(objective, model, tokens, num_chars=chars)


def train_run(kind, ds, args, seed, steps, eval_every, eval_tokens, eval_chars, log):
    """Train one model; returns (curve, best_state, best_step, wall seconds of training)."""
    V = ds.tokenizer.vocab_size
    torch.manual_seed(seed)
    model = build_text_dit(args.model, V, causal=kind == "ar", max_seq_len=ds.seq_len, **args.model_overrides)
    objective = MaskedDiffusion(V) if kind == "mdlm" else AutoregressiveLM(V)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    curve, best, best_state, best_step, train_s = [], math.inf, None, 0, 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args.lr, args.warmup, steps)
        idx = torch.randint(0, ds.train.shape[0], (args.batch_size,), generator=g)
        loss = objective.loss(model, ds.train[idx], None, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_s += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            res = evaluate(kind, objective, model, eval_tokens, eval_chars, args.eval_passes, seed)
            model.train()
            curve.append({"step": step, "bpc": res.bits_per_char, "stderr": res.stderr_bits_per_char, "train_s": train_s})
            log(f"  {kind:4s} seed {seed} step {step:5d}  val bpc {res.bits_per_char:.4f} "
                f"(+- {res.stderr_bits_per_char:.4f})  train {train_s:6.1f}s")
            if res.bits_per_char < best:
                best, best_state, best_step = res.bits_per_char, copy.deepcopy(model.state_dict()), step
    model.load_state_dict(best_state)
    return model.eval(), objective, curve, best_step, train_s


def sample_text(kind, objective, model, L, n, seed, steps):
    net = lambda x, t: model(x, t, None)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    if kind == "mdlm":
        return ancestral(objective.denoiser(net), canvas(L, objective.mask_id, n), steps, mask_id=objective.mask_id,
                         cache=True, generator=g)
    return autoregressive(objective.denoiser(net, L), torch.zeros(n, 0, dtype=torch.long), L, generator=g)


def part_likelihood(args, log):
    ds = build_text_dataset(args.data, args.seq_len, "char", val_fraction=args.val_fraction)
    V = ds.tokenizer.vocab_size
    log(f"data: {args.data}: vocab {V}, {ds.train.shape[0]} train / {ds.val.shape[0]} val chunks of {ds.seq_len} chars; "
        f"{ds.num_val_overlaps} validation chunks found verbatim in training (dropped)")
    probe = build_text_dit(args.model, V, max_seq_len=ds.seq_len, **args.model_overrides)
    macs = text_forward_macs(probe, ds.seq_len)
    info = {
        "params": count_params(probe),
        "train_flops_per_step": 6 * macs * args.batch_size,
        "train_flops_total": 6 * macs * args.batch_size * args.steps,
        "unigram_bpc": unigram_bpc(ds),
    }
    log(f"model {args.model} {args.model_overrides}: {info['params'] / 1e6:.2f}M params, "
        f"{info['train_flops_total'] / 1e12:.2f} TFLOP of training per run; unigram entropy {info['unigram_bpc']:.3f} bpc")
    n_eval = min(args.eval_seqs, ds.val.shape[0])
    eval_tokens, eval_chars = ds.val[:n_eval], ds.val_chars[:n_eval]
    runs = []
    for seed in args.seeds:
        for kind in ("mdlm", "ar"):
            model, objective, curve, best_step, train_s = train_run(
                kind, ds, args, seed, args.steps, args.eval_every, eval_tokens, eval_chars, log
            )
            full = evaluate(kind, objective, model, ds.val, ds.val_chars, args.final_passes, seed)
            run = {"kind": kind, "seed": seed, "curve": curve, "best_step": best_step, "train_s": train_s,
                   "full_val": full.to_dict()}
            if kind == "mdlm":
                count = evaluate(kind, objective, model, ds.val, ds.val_chars, args.final_passes, seed, "count")
                run["full_val_count_form"] = count.to_dict()
            t0 = time.perf_counter()
            samples = sample_text(kind, objective, model, ds.seq_len, 4, seed, ds.seq_len)
            run["sample_s"] = time.perf_counter() - t0
            run["samples"] = [ds.tokenizer.decode(r) for r in samples.tolist()]
            run["distinct_4"] = distinct_ngrams(samples, 4)
            runs.append(run)
            extra = (f", count form {run['full_val_count_form']['bits_per_char']:.4f}" if kind == "mdlm" else "")
            log(f"  -> {kind} seed {seed}: best step {best_step}, full val bpc {full.bits_per_char:.4f} "
                f"(+- {full.stderr_bits_per_char:.4f}){extra}")
    return {"dataset": str(args.data), "vocab_size": V, "seq_len": ds.seq_len, "num_train": ds.train.shape[0],
            "num_val": ds.val.shape[0], "val_overlaps_dropped": ds.num_val_dropped, **info, "runs": runs}


def unigram_bpc(ds) -> float:
    counts = torch.bincount(ds.train.reshape(-1), minlength=ds.tokenizer.vocab_size).double()
    p = counts / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def part_synthetic(args, log):
    out = []
    checks = {"synthetic-sums": is_valid_sum, "synthetic-brackets": is_balanced}
    for corpus in args.synthetic:
        ds = build_text_dataset(corpus, args.syn_seq_len, "char", synthetic_docs=args.syn_docs)
        L = ds.seq_len
        evals = ds.val[: min(128, ds.val.shape[0])]
        fmt_ok = (lambda s: re.fullmatch(r"\d+\+\d+=\d+", s) is not None) if corpus.endswith("sums") else None
        for kind in ("mdlm", "ar"):
            model, objective, curve, best_step, train_s = train_run(
                kind, ds, _syn_args(args), 0, args.syn_steps, max(1, args.syn_steps // 4), evals, None, log
            )
            rows = []
            settings = [(s, c) for s in args.syn_sampler_steps for c in (False, True)] if kind == "mdlm" else [(L, False)]
            for steps, cache in settings:
                res = {}

                def draw():
                    res["x"] = (sample_text_plain(objective, model, L, args.syn_samples, steps, cache)
                                if kind == "mdlm" else sample_text("ar", objective, model, L, args.syn_samples, 0, L))
                    return res["x"]

                th = sampling_throughput(draw)
                valid = fraction_valid(res["x"], ds.tokenizer, checks[corpus])
                row = {"sampler_steps": steps, "cache": cache, **valid, "tokens_per_s": th["tokens_per_s"]}
                if fmt_ok is not None:
                    row["fraction_well_formed"] = fraction_valid(res["x"], ds.tokenizer, fmt_ok)["fraction_valid"]
                rows.append(row)
                log(f"  {corpus} {kind:4s} steps {steps:4d} cache {cache!s:5s}: valid {valid['fraction_valid']:.3f} "
                    f"of {int(valid['num_documents'])} docs, {th['tokens_per_s']:.0f} tokens/s")
            out.append({"corpus": corpus, "kind": kind, "train_steps": args.syn_steps, "train_s": train_s,
                        "final_bpc": curve[-1]["bpc"], "rows": rows,
                        "example": ds.tokenizer.decode(res["x"][0].tolist())})
    return out


def sample_text_plain(objective, model, L, n, steps, cache):
    net = lambda x, t: model(x, t, None)  # noqa: E731
    return ancestral(objective.denoiser(net), canvas(L, objective.mask_id, n), steps, mask_id=objective.mask_id,
                     cache=cache, generator=torch.Generator().manual_seed(1))


def _syn_args(args):
    a = copy.copy(args)
    a.model, a.model_overrides, a.lr, a.warmup, a.batch_size = "TextDiT-T", args.syn_model, args.syn_lr, 50, 32
    return a


def print_summary(lik, syn, log):
    if lik:
        log("\nbits per character on the full validation split, each run at its best validation point")
        log(f"{'seed':>4} | {'MDLM bound':>18} | {'AR exact':>8} | {'gap':>6} | {'MDLM count form':>15}")
        by = {(r["kind"], r["seed"]): r for r in lik["runs"]}
        gaps = []
        for seed in sorted({r["seed"] for r in lik["runs"]}):
            m, a = by[("mdlm", seed)], by[("ar", seed)]
            mb, ab = m["full_val"]["bits_per_char"], a["full_val"]["bits_per_char"]
            gaps.append(mb / ab - 1)
            log(f"{seed:>4} | {mb:9.4f} +- {m['full_val']['stderr_bits_per_char']:.4f} | {ab:8.4f} | {100 * gaps[-1]:5.1f}% | "
                f"{m['full_val_count_form']['bits_per_char']:15.4f}")
        lik["gap_mean"] = sum(gaps) / len(gaps)
        log(f"mean gap MDLM vs AR: {100 * lik['gap_mean']:.1f}% (target <= 15%)")
        log("\ncurves (val subset bpc by step):")
        for r in lik["runs"]:
            log(f"  {r['kind']:4s} seed {r['seed']}: " + " ".join(f"{c['step']}:{c['bpc']:.3f}" for c in r["curve"]))
        for r in lik["runs"]:
            if r["seed"] == lik["runs"][0]["seed"]:
                log(f"\n{r['kind']} samples (seed {r['seed']}, distinct-4 {r['distinct_4']:.3f}):")
                for s in r["samples"][:2]:
                    log("  | " + s.replace("\n", "\n  | "))
    if syn:
        log("\nsynthetic language: fraction of valid documents and sampling throughput")
        for entry in syn:
            for row in entry["rows"]:
                wf = f"  well-formed {row['fraction_well_formed']:.3f}" if "fraction_well_formed" in row else ""
                log(f"  {entry['corpus']:19s} {entry['kind']:4s} steps {row['sampler_steps']:4d} cache {row['cache']!s:5s} "
                    f"valid {row['fraction_valid']:.3f}{wf}  {row['tokens_per_s']:8.0f} tok/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt", help="text file for part 1")
    p.add_argument("--out", default="text_mdlm_vs_ar.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="TextDiT-T")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-seqs", type=int, default=256, help="validation chunks for the curves")
    p.add_argument("--eval-passes", type=int, default=2, help="MDLM time samples per chunk for the curves")
    p.add_argument("--final-passes", type=int, default=4, help="MDLM time samples per chunk on the full split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--skip-likelihood", action="store_true")
    p.add_argument("--synthetic", nargs="*", default=["synthetic-sums", "synthetic-brackets"])
    p.add_argument("--syn-steps", type=int, default=1500)
    p.add_argument("--syn-seq-len", type=int, default=32)
    p.add_argument("--syn-docs", type=int, default=8000)
    p.add_argument("--syn-lr", type=float, default=3e-3)
    p.add_argument("--syn-samples", type=int, default=32)
    p.add_argument("--syn-sampler-steps", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model_overrides = {k: v for k, v in (("hidden_size", args.hidden_size), ("depth", args.depth),
                                               ("num_heads", args.num_heads)) if v is not None}
    args.syn_model = dict(hidden_size=64, depth=2, num_heads=4)
    if not args.skip_likelihood and not Path(args.data).exists():
        p.error(f"--data {args.data} not found: give the path of a text file (e.g. tinyshakespeare.txt)")

    def log(msg):
        print(msg, flush=True)

    start = time.time()
    lik = None if args.skip_likelihood else part_likelihood(args, log)
    syn = part_synthetic(args, log) if args.synthetic else []
    print_summary(lik, syn, log)
    result = {"command": " ".join(sys.argv), "threads": args.threads, "wall_s": time.time() - start,
              "likelihood": lik, "synthetic": syn,
              "settings": {k: v for k, v in vars(args).items() if k not in ("model_overrides", "syn_model")}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"\nwrote {args.out} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

"""Block diffusion (BD3-LM) along the block size, against MDLM and AR (issue 23, docs/text.md).

Part 1, likelihood (``--data``, tinyshakespeare from ``../shared/data/``, character level, 64-character
chunks, TextDiT-T, the ``shakespeare_char`` recipe's optimiser, batch and schedule): one model per
block size in ``--block-sizes`` (64 = L is MDLM trained through the two-pass forward; 1 is the AR
limit) plus the AR baseline, ``--steps`` steps each. Bits per character on the validation split
(``--max-val`` chunks, default all) of the EMA weights: BD3-LM's NELBO in its number-of-masks form
(``block_diffusion_bound``; exact for block size 1) with its standard error over passes, AR exact.

Part 2, sampling speed: generated tokens per second for ``--speed-tokens`` tokens (batch
``--speed-batch``) with and without the KV cache: AR (context ``speed-tokens + 1`` so the whole
sequence stays in the cache: the 3x target is at 256 tokens) and BD3-LM at each block size > 1
(``block_size`` denoising steps per block, the 64-token training window sliding by blocks).

Part 3, ``text_sums`` (synthetic a+b=c, the recipe's model and ``--sums-steps``): validity of
unprompted samples and infill accuracy (``SEP a+b= _ SEP`` templates; AR: the prompt ``SEP a+b=``)
for MDLM, MDLM + ReMDM remasking, BD3-LM (``--sums-block``) and AR.

Every model is trained by the plain loop below (AdamW, warm-up then cosine, gradient clipping, EMA
with warm-up: the shared trainer's settings from the recipes), so that the models of every block
size and the AR baseline see the same batches in the same order from the same seed.

    OMP_NUM_THREADS=1 python benchmarks/text_block_diffusion.py --data ../shared/data/tinyshakespeare.txt \\
        --steps 6000 --out text_block_diffusion.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ditkit.data.text import complete_segments, is_valid_sum
from ditkit.data.text_loader import load_text_data
from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.block import BlockDiffusion
from ditkit.diffusion.masked import MaskedDiffusion
from ditkit.eval.text import autoregressive_nll, block_diffusion_bound
from ditkit.models.text_dit import KVCache, TextDiT, build_text_dit
from ditkit.recipes import get_recipe
from ditkit.samplers.autoregressive import autoregressive, cached_next_token
from ditkit.samplers.block import block_diffusion
from ditkit.samplers.masked import ancestral, canvas

# BD3-LM's clipped mask-rate ranges (Arriola et al. 2025, Sec. 4 / Table 6: U[0.45, 0.95] for block
# size 4, U[0.3, 0.8] for 16). Block size 1: E[1{masked} / t | t] = 1 for every t, so any range keeps
# the expected gradient and a high one cuts its variance. One block (MDLM): unclipped.
CLIP = {1: (0.5, 1.0), 4: (0.45, 0.95), 16: (0.3, 0.8)}


def make(kind: str, vocab: int, seq_len: int, block_size: int, eps: float, preset: dict[str, Any],
         clip: tuple[float, float] | None = None):
    """(model, objective) for ``kind`` in block | masked | ar; ``clip`` replaces ``CLIP``'s range."""
    model = build_text_dit(preset.pop("name"), vocab, causal=kind == "ar", max_seq_len=max(seq_len, 512), **preset)
    if kind == "ar":
        return model, AutoregressiveLM(vocab)
    if kind == "masked":
        return model, MaskedDiffusion(vocab, eps=eps)
    lo, hi = (clip or CLIP.get(block_size, (0.0, 1.0))) if block_size < seq_len else (0.0, 1.0)
    return model, BlockDiffusion(vocab, block_size, eps=eps, noise_min=lo, noise_max=hi)


def train_model(model: TextDiT, objective: Any, tokens: torch.Tensor, t: Any, steps: int, seed: int,
                log: Callable[[str], None], score_at: dict[int, Callable[[TextDiT], float]] | None = None,
                ) -> tuple[TextDiT, dict[str, Any]]:
    """AdamW, linear warm-up then cosine to ``lr * min_lr_ratio``, clipping, EMA; returns the EMA copy.

    ``score_at`` maps steps (1-based) to a scorer of the EMA weights at that step; the scores come back
    as ``info["curve"]`` (``[[step, score], ...]``), the scoring time left out of ``train_seconds``."""
    torch.manual_seed(seed)
    gen, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    start, losses, curve, scoring = time.perf_counter(), [], [], 0.0
    for step in range(steps):
        if step < t.warmup_steps:
            lr = t.lr * (step + 1) / t.warmup_steps
        else:
            progress = (step - t.warmup_steps) / max(1, steps - t.warmup_steps)
            lr = t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, tokens.shape[0], (t.global_batch_size,), generator=gen)
        loss = objective.loss(model, tokens[idx], None, generator=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        decay = min(t.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss))
        if score_at and step + 1 in score_at:
            t0 = time.perf_counter()
            curve.append([step + 1, score_at[step + 1](ema)])
            scoring += time.perf_counter() - t0
            log(f"  step {step + 1}: score {curve[-1][1]:.4f}")
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({(step + 1) / (time.perf_counter() - start):.2f} steps/s)")
    return ema, {"train_seconds": time.perf_counter() - start - scoring,
                 "final_loss": sum(losses[-100:]) / len(losses[-100:]), **({"curve": curve} if score_at else {})}


def tokens_per_s(fn: Callable[[], torch.Tensor], generated: int) -> dict[str, float]:
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": generated / seconds, "seconds": seconds, "out": out}  # type: ignore[dict-item]


def ar_sample(model: TextDiT, prefix: torch.Tensor, n: int, context_len: int, use_cache: bool, seed: int) -> torch.Tensor:
    objective, net = AutoregressiveLM(model.vocab_size), (lambda x, t: model(x, t, None))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(prefix.shape[0])]
    if not use_cache:
        return autoregressive(objective.denoiser(net, context_len), prefix, n, generator=gens)
    with model.use_kv_cache(KVCache()) as cache:
        return autoregressive(cached_next_token(net, cache, bos_id=objective.bos_id, context_len=context_len),
                              prefix, n, generator=gens)


def bd3_sample(model: TextDiT, objective: BlockDiffusion, prefix: torch.Tensor, n: int, context_len: int,
               use_cache: bool, steps: int, seed: int, **options: Any) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(prefix.shape[0])]
    with model.use_kv_cache(KVCache(objective.block_size)) as cache:
        den = objective.denoiser(lambda x, t: model(x, t, None), cache, context_len=context_len, use_cache=use_cache)
        return block_diffusion(den, prefix, n, block_size=objective.block_size, num_steps=steps,
                               mask_id=objective.mask_id, cache=True, generator=gens, **options)


def part_likelihood(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = get_recipe("shakespeare_char")
    cfg.data.dataset = args.data
    if args.lr is not None:
        cfg.train.lr = args.lr
    data = load_text_data(cfg.data)
    V, L, tok = data.tokenizer.vocab_size, cfg.data.seq_len, data.tokenizer
    val, chars = data.text.val, data.text.val_chars
    if args.max_val:
        val, chars = val[: args.max_val], chars[: args.max_val]
    preset = {"name": cfg.model.name, "time_conditioning": False}
    rows, speed = [], []
    for kind, bs in [("block", b) for b in args.block_sizes] + ([] if args.no_ar else [("ar", 0)]):
        label = "AR" if kind == "ar" else ("MDLM (block = L)" if bs == L else f"BD3-LM block {bs}")
        log(f"{label}: training {args.steps} steps")
        model, objective = make(kind, V, L, bs or L, cfg.objective.mask_eps, dict(preset),
                                clip=tuple(args.clip) if args.clip else None)

        def score(net: TextDiT, kind: str = kind, objective: Any = objective) -> Any:
            with torch.no_grad():
                if kind == "ar":
                    return autoregressive_nll(objective, net, val, num_chars=chars)
                return block_diffusion_bound(objective, net, val, num_chars=chars, num_passes=args.passes,
                                             generator=torch.Generator().manual_seed(0))

        at = {s: (lambda net: score(net).bits_per_char) for s in args.score_at if 0 < s < args.steps}
        model, info = train_model(model, objective, data.tokens, cfg.train, args.steps, args.seed, log, at)
        t0 = time.perf_counter()
        lik = score(model)
        row = {"model": label, "block_size": bs or None, "steps": args.steps, "lr": cfg.train.lr, **info,
               "clip": [objective.noise_min, objective.noise_max] if kind == "block" else None,
               "bits_per_char": lik.bits_per_char, "stderr": lik.stderr_bits_per_char, "exact": lik.exact,
               "num_val_chunks": lik.num_sequences, "eval_seconds": time.perf_counter() - t0}
        log(f"  {label}: {lik.bits_per_char:.3f} +- {lik.stderr_bits_per_char:.3f} bits/char")
        rows.append(row)
        if args.skip_speed:
            continue
        # ---- sampling speed, with and without the KV cache
        prefix = torch.zeros(args.speed_batch, 0, dtype=torch.long)
        n = args.speed_tokens
        with torch.no_grad():
            if kind == "ar":
                runs = {c: tokens_per_s(lambda c=c: ar_sample(model, prefix, n, n + 1, c, 0), n * args.speed_batch)
                        for c in (True, False)}
                context = n + 1
            elif bs < L and bs > 1:
                runs = {c: tokens_per_s(lambda c=c: bd3_sample(model, objective, prefix, n, L, c, bs, 0),
                                        n * args.speed_batch) for c in (True, False)}
                context = L
            else:
                runs = {}
        if runs:
            same = bool(torch.equal(runs[True]["out"], runs[False]["out"]))
            speed.append({"model": label, "tokens": n, "batch": args.speed_batch, "context": context,
                          "tokens_per_s_cache": runs[True]["tokens_per_s"], "tokens_per_s_no_cache": runs[False]["tokens_per_s"],
                          "speedup": runs[True]["tokens_per_s"] / runs[False]["tokens_per_s"], "same_tokens": same,
                          "example": tok.decode(runs[True]["out"][0, :160].tolist())})
            log(f"  speed at {n} tokens: {speed[-1]['tokens_per_s_cache']:.0f} vs {speed[-1]['tokens_per_s_no_cache']:.0f} "
                f"tokens/s ({speed[-1]['speedup']:.1f}x, same tokens: {same})")
    return {"corpus": args.data, "vocab_size": V, "seq_len": L, "likelihood": rows, "speed": speed}


def part_sums(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = get_recipe("text_sums")
    data = load_text_data(cfg.data)
    tok, V, L = data.tokenizer, data.tokenizer.vocab_size, cfg.data.seq_len
    m = cfg.model
    preset = {"name": m.name, "hidden_size": m.hidden_size, "depth": m.depth, "num_heads": m.num_heads,
              "time_conditioning": False}
    rng = random.Random(0)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(args.sums_samples)]
    results = []

    def validity(samples: torch.Tensor) -> float:
        docs = [tok.decode(s) for row in samples.tolist() for s in complete_segments(row, tok.sep_id)]
        return sum(map(is_valid_sum, docs)) / max(len(docs), 1)

    for kind, bs in (("masked", 0), ("block", args.sums_block), ("ar", 0)):
        model, objective = make(kind, V, L, bs or L, cfg.objective.mask_eps, dict(preset))
        model, info = train_model(model, objective, data.tokens, cfg.train, args.sums_steps, args.seed, lambda s: None)
        n = args.sums_samples
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
        with torch.no_grad():
            variants: dict[str, dict[str, Any]] = {}
            if kind == "masked":
                den = objective.denoiser(lambda x, t: model(x, t, None))
                for name, eta in (("MDLM", 0.0), (f"MDLM + ReMDM (eta {args.remdm_eta})", args.remdm_eta)):
                    free = ancestral(den, canvas(L, V, n), L, mask_id=V, cache=True, remdm_eta=eta, generator=gens())
                    tmpl = [[tok.sep_id] + tok.encode(f"{a}+{b}=") + [V] * len(str(a + b)) + [tok.sep_id] for a, b in pairs]
                    filled = [ancestral(den, torch.tensor([t]), 8, mask_id=V, cache=True, remdm_eta=eta,
                                        generator=torch.Generator().manual_seed(i))[0] for i, t in enumerate(tmpl)]
                    variants[name] = {"free": free, "filled": filled, "tmpl": tmpl}
            elif kind == "block":
                free = bd3_sample(model, objective, torch.zeros(n, 0, dtype=torch.long), L, L, True, bs, 0)
                tmpl = [[tok.sep_id] + tok.encode(f"{a}+{b}=") + [V] * len(str(a + b)) + [tok.sep_id] for a, b in pairs]
                filled = [bd3_sample(model, objective, torch.tensor([t]), 0, L, True, 8, i)[0] for i, t in enumerate(tmpl)]
                variants[f"BD3-LM block {bs}"] = {"free": free, "filled": filled, "tmpl": tmpl}
            else:
                free = ar_sample(model, torch.zeros(n, 0, dtype=torch.long), L, L, True, 0)
                filled, tmpl = [], []
                for i, (a, b) in enumerate(pairs):
                    prompt = [tok.sep_id] + tok.encode(f"{a}+{b}=")
                    out = ar_sample(model, torch.tensor([prompt]), len(str(a + b)) + 1, L, True, i)[0]
                    filled.append(out)
                    tmpl.append(prompt + [V] * (len(str(a + b)) + 1))
                variants["AR"] = {"free": free, "filled": filled, "tmpl": tmpl}
        for name, v in variants.items():
            correct = 0
            for (a, b), out in zip(pairs, v["filled"]):
                text = tok.decode(out.tolist()[1:]).split("\n")[0]
                correct += text == f"{a}+{b}={a + b}"
            row = {"model": name, "steps": args.sums_steps, "fraction_valid": validity(v["free"]),
                   "infill_accuracy": correct / len(pairs), "train_seconds": info["train_seconds"]}
            log(f"  sums {name}: valid {row['fraction_valid']:.3f}, infill {row['infill_accuracy']:.3f}")
            results.append(row)
    return {"sums": results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--out", default="text_block_diffusion.json")
    p.add_argument("--steps", type=int, default=6000, help="training steps per model of part 1")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 16, 4, 1])
    p.add_argument("--passes", type=int, default=4, help="bound passes over the validation chunks")
    p.add_argument("--max-val", type=int, default=0, help="validation chunks scored (0: all)")
    p.add_argument("--speed-tokens", type=int, default=256)
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--sums-steps", type=int, default=300)
    p.add_argument("--sums-samples", type=int, default=32)
    p.add_argument("--sums-block", type=int, default=4)
    p.add_argument("--remdm-eta", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-likelihood", action="store_true")
    p.add_argument("--skip-sums", action="store_true")
    p.add_argument("--lr", type=float, default=None, help="part 1's peak learning rate (default: the recipe's)")
    p.add_argument("--clip", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="part 1's clipped mask-rate range for every block size < L (default: CLIP)")
    p.add_argument("--score-at", type=int, nargs="*", default=[],
                   help="part 1: also score the EMA weights at these steps (a learning curve)")
    p.add_argument("--skip-speed", action="store_true", help="leave out part 1's sampling-speed runs")
    p.add_argument("--no-ar", action="store_true",
                   help="leave out the AR baseline of part 1 (to split the block sizes over processes)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    start = time.perf_counter()
    report: dict[str, Any] = {"args": vars(args), "torch_threads": args.threads}
    if not args.skip_sums:
        report.update(part_sums(args, log))
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if not args.skip_likelihood:
        report.update(part_likelihood(args, log))
    report["wall_s"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} ({report['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())

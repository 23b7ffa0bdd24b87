"""Training-step throughput of a DiT against the machine's own matmul peak (MFU), one table.

Each case runs in a fresh subprocess (clean peak memory, clean compile caches) that first measures
the matmul peak at its own precision (large square matmuls, median of repeats), then times the
training step ditkit's loop runs: objective loss under autocast, backward, gradient clipping,
fused AdamW, EMA update. Achieved FLOP/s use the analytic count 6 x forward MACs per image
(forward + backward = 3 x forward, 2 FLOPs per MAC); MFU = achieved / measured peak.

A case is a precision (fp32 or bf16) with optional '+' suffixes: '+compile' (torch.compile of the
model), '+official' (the official DiT train.py's step on ditkit's model: see
_official_style_step), '+bf16weights' (a low-precision copy of the weights for forward and
backward with float32 master weights in the optimiser, instead of autocast's casts: see
_bf16_weights_step) and '+devnoise' (draw the diffusion noise and times with a generator on the device; the
training loop draws them on the CPU so a seed gives the same run on any device). On CUDA, fp32
means TF32 matmuls, as in the training loop.

    python benchmarks/train_throughput.py                      # DiT-S/2, 32x32x4, batch 8
    python benchmarks/train_throughput.py --cases fp32,bf16,bf16+compile --steps 10
    python benchmarks/train_throughput.py --model TextDiT-S --seq-len 256 --batch 8   # text (MDLM)
    python benchmarks/train_throughput.py --model DiT-XL/2 --batch 32 --device cuda   # on a GPU
    python benchmarks/train_throughput.py --model DiT-XS/4 --channels 1 --num-classes 40 --batch 128 \
        --cases fp32,bf16 --threads 1 --pos-embed rope   # RoPE's cost (docs/video.md)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, peak_memory_mib, print_table, wall_and_cpu_seconds, write_json


def _official_style_step(model, objective, x, y, dtype, noise):
    """The training step of the official DiT train.py, reproduced on ditkit's (numerically
    identical) model so the two run in one process: attention through F.scaled_dot_product_attention
    (timm's Attention; on the CPU, the flash kernel), AdamW with torch's default implementation,
    the EMA as a per-parameter loop (its update_ema), `loss.item()` every step (its running loss),
    no gradient clipping. Not the official code itself, which is not vendored here."""
    from collections import OrderedDict

    import torch.nn.functional as F

    from ditkit.models import layers
    from ditkit.train.precision import autocast

    layers.attention = lambda q, k, v, is_causal=False: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params = OrderedDict(ema.named_parameters())
    model_params = OrderedDict(model.named_parameters())
    device = x.device

    def step() -> None:
        with autocast(device, dtype):
            loss = objective.loss(model, x, y, generator=noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, param in model_params.items():  # the official update_ema(ema, model)
            ema_params[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)
        loss.item()  # running_loss += loss.item()

    return step


def _bf16_weights_step(model, objective, x, y, dtype, noise, params):
    """The training step with a low-precision copy of the weights for forward and backward, the
    float32 weights kept as the optimiser's master copy (classic mixed precision, Micikevicius et
    al. 2018) instead of autocast casting every weight at every step. Per step: the copy's
    gradients are cast to the master's ``.grad`` in one ``_foreach_copy_``, AdamW updates the
    master, and the master is cast back into the copy in one ``_foreach_copy_``. Autocast stays
    on for the ops it keeps in float32 (norms, softmax); it has no weights left to cast."""
    from ditkit.train.ema import EMA
    from ditkit.train.precision import autocast

    low = copy.deepcopy(model).to(dtype)
    low_params = [p for p in low.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    ema = EMA(model, 0.9999)
    device = x.device

    def step() -> None:
        with autocast(device, dtype):
            loss = objective.loss(low, x, y, generator=noise).mean()
        loss.backward()
        for p in params:  # first step: float32 gradient buffers to cast into
            if p.grad is None:
                p.grad = torch.empty_like(p)
        torch._foreach_copy_([p.grad for p in params], [p.grad for p in low_params])
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        for p in low_params:
            p.grad = None
        with torch.no_grad():
            torch._foreach_copy_(low_params, params)
        ema.update(model)

    return step


def run_case(args: argparse.Namespace, case: str) -> dict:
    """Time one case in this process: 'fp32' or 'bf16' with optional suffixes (module docstring)."""
    from ditkit.diffusion import GaussianDiffusion, make_schedule
    from ditkit.models.dit import build_dit, count_params, forward_macs
    from ditkit.train.ema import EMA
    from ditkit.train.precision import autocast

    precision, *extras = case.split("+")
    unknown = set(extras) - {"compile", "official", "devnoise", "bf16weights"}
    # the official-style step is never compiled; the bf16-weights step is neither compiled nor official
    if unknown or {"compile", "official"} <= set(extras) or ("bf16weights" in extras and {"compile", "official"} & set(extras)):
        raise SystemExit(f"case {case!r}: use fp32|bf16 with +compile, +official, +bf16weights or +devnoise "
                         f"(+official and +bf16weights alone; {sorted(unknown)} unknown)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    device = torch.device(args.device)
    if device.type == "cuda":  # as the training loop: TF32 for fp32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if args.model.startswith("TextDiT"):  # masked diffusion (MDLM) on token ids, no time conditioning
        from ditkit.diffusion.masked import MaskedDiffusion
        from ditkit.models.text_dit import build_text_dit, text_forward_macs

        model = build_text_dit(args.model, vocab_size=args.vocab_size, time_conditioning=False).to(device)
        objective = MaskedDiffusion(args.vocab_size)
        macs_per_item = text_forward_macs(model, args.seq_len)
        x = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device)
        y = None
    else:
        model = build_dit(args.model, input_size=args.image_size, in_channels=args.channels,
                          num_classes=args.num_classes, learn_sigma=True, pos_embed=args.pos_embed).to(device)
        objective = GaussianDiffusion(make_schedule("linear", 1000), learn_sigma=True)
        macs_per_item = forward_macs(model)
        x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
        y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    net = torch.compile(model) if "compile" in extras else model
    noise = torch.Generator(device if "devnoise" in extras else "cpu").manual_seed(0)
    if "official" in extras:
        step = _official_style_step(model, objective, x, y, dtype, noise)
    elif "bf16weights" in extras:
        step = _bf16_weights_step(model, objective, x, y, dtype, noise, params)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
        ema = EMA(model, 0.9999)

        def step() -> None:
            with autocast(device, dtype):
                loss = objective.loss(net, x, y, generator=noise).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)

    t0 = time.perf_counter()
    step()  # includes compilation when compiling
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0
    flops = 6 * macs_per_item * args.batch
    # Interleave step timings with peak measurements so both see the same machine load; MFU is
    # the median of the per-pair ratios (robust on a shared, noisy machine).
    # On the CPU, MFU is also given in process CPU time (immune to time-slicing by other jobs).
    n = args.peak_n or (8192 if device.type == "cuda" else 2048)  # big enough to reach the peak
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(2):
        step(), a @ b
    step_times, peaks, cpu_ratios = [], [], []
    for _ in range(args.steps):
        wall, cpu = wall_and_cpu_seconds(step, args.device)
        mm_wall, mm_cpu = min((wall_and_cpu_seconds(lambda: a @ b, args.device) for _ in range(3)), key=lambda p: p[0])
        step_times.append(wall)
        peaks.append(2 * n**3 / mm_wall / 1e9)
        cpu_ratios.append((flops / cpu) / (2 * n**3 / mm_cpu))
    memory = peak_memory_mib(args.device)
    if args.profile:  # where one step's time goes: torch.profiler, ops by self time, to stderr
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile of 3 steps, case {case}:\n" + prof.key_averages().table(sort_by=sort, row_limit=args.profile),
              file=sys.stderr)
    seconds, peak = statistics.median(step_times), statistics.median(peaks)
    mfu = statistics.median(flops / s / 1e9 / p for s, p in zip(step_times, peaks))
    achieved = flops / seconds / 1e9
    return {
        "case": case, "model": args.model, "params_M": count_params(model) / 1e6, "batch": args.batch,
        "step_s": seconds, "images_per_s": args.batch / seconds, "first_step_s": first_step_s,
        "GFLOP_per_step": flops / 1e9, "achieved_GFLOPs": achieved, "peak_GFLOPs": peak,
        "MFU": mfu, "MFU_cpu_time": statistics.median(cpu_ratios), "peak_mem_MiB": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos-embed", choices=["sincos", "rope"], default="sincos", help="image DiTs: positions")
    parser.add_argument("--seq-len", type=int, default=256, help="text models (TextDiT-*): tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=65, help="text models: vocabulary (65: tinyshakespeare chars)")
    parser.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (0: 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per case (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="fp32,bf16,bf16+compile")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default="benchmarks/results/train_throughput.json")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile 3 steps of each case and print the top ROWS ops by self time")
    parser.add_argument("--one-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_case:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args, args.one_case)))
        return
    rows = []
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one-case", case]
        # A fresh compile cache per case, so first_step_s is the real (cold) compile time.
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"case {case} failed")
        if args.profile:
            print(out.stderr[out.stderr.find("profile of"):], file=sys.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {case}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr)
    shape = f"sequence {args.seq_len}" if args.model.startswith("TextDiT") else f"{args.image_size}x{args.image_size}x{args.channels}"
    print(f"{args.model} at {shape}, batch {args.batch}, {machine()}")
    table = print_table(rows, ["case", "step_s", "images_per_s", "achieved_GFLOPs", "peak_GFLOPs", "MFU", "MFU_cpu_time",
                               "peak_mem_MiB", "first_step_s"])
    write_json(args.json, {"machine": machine(), "args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    main()

"""Attention forward+backward: F.scaled_dot_product_attention vs ditkit's attention() per dtype.

Why: on CPUs the flash-attention kernel is slow in bf16, so ditkit.models.layers.attention takes
two explicit matmuls there. This prints the times behind that choice (median of repeats, one run).

    python benchmarks/attention.py [--batch 8 --heads 6 --tokens 256 --head-dim 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import machine, median_seconds, print_table, write_json

from ditkit.models.layers import attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/attention.json")
    args = parser.parse_args()
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        for name, fn in (("sdpa", F.scaled_dot_product_attention), ("ditkit", attention)):
            def run(fn=fn):
                fn(q, k, v).sum().backward()
            ms = 1000 * median_seconds(run, repeats=args.repeats, warmup=3)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "impl": name, "fwd+bwd ms": ms})
    for dtype in ("float32", "bfloat16"):
        sdpa, ours = (r["fwd+bwd ms"] for r in rows if r["dtype"] == dtype)
        rows.append({"dtype": dtype, "impl": "speed-up", "fwd+bwd ms": sdpa / ours})
    print(f"shape (B, heads, tokens, head_dim) = {shape}")
    print_table(rows, ["dtype", "impl", "fwd+bwd ms"])
    write_json(args.json, {"machine": machine(), "shape": shape, "rows": rows})


if __name__ == "__main__":
    main()

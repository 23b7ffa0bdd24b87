"""What exporting to diffusers loses for a model trained with the official timestep convention.

diffusers' ``DiTTransformer2DModel`` computes its timestep sinusoid with ``downscale_freq_shift=1``;
official DiT and ditkit's default use 0 (``model.timestep_freq_shift``). This script exports a
trained ditkit checkpoint with ``ditkit.interop.diffusers_format.export_diffusers``, loads it with
diffusers, and draws the same samples (same labels, seeds, sampler, steps and guidance) two ways:

* ``ditkit``: the checkpoint's own network through ``ImagePipeline``;
* ``diffusers export``: the exported ``DiTTransformer2DModel`` driven by the same ``ImagePipeline``
  (ditkit's sampler and guidance) through a small adapter, ``forward(x, t, y) ->
  transformer(x, timestep=t, class_labels=y).sample``. ``DiTPipeline`` itself needs a VAE and
  hard-codes the null class 1000, so for a 10-class pixel model the adapter is the way to run
  diffusers' network; the sampler is then identical, and only the network differs.

Both are scored with ``ditkit.eval`` against the training data (FD in ditkit's classifier
features, precision / recall, conditional accuracy). It also prints the output difference of one
network call at several t, relative to the output's largest magnitude, and checks that the same
weights with ``timestep_freq_shift=1`` match the export (the rest of the conversion is exact).

    python benchmarks/diffusers_export_shift.py --ckpt results/digits --num-samples 500 --seeds 0 5000 \\
        --out docs/results/diffusers_export_shift_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from ditkit.eval.model_eval import build_evaluator, evaluate_generator  # noqa: E402
from ditkit.interop.diffusers_format import export_diffusers  # noqa: E402
from ditkit.pipelines.image import ImagePipeline  # noqa: E402


class DiffusersAdapter(torch.nn.Module):
    """A diffusers ``DiTTransformer2DModel`` behind ditkit's ``forward(x, t, y)`` (t: DDPM index, (B,))."""

    def __init__(self, transformer: torch.nn.Module, like: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        for name in ("in_channels", "out_channels", "input_size", "num_classes", "learn_sigma", "patch_size"):
            setattr(self, name, getattr(like, name))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y).sample


@torch.no_grad()
def call_differences(model: torch.nn.Module, exported: torch.nn.Module) -> dict:
    """Max |ditkit - export| / max |ditkit| of one call, per t, on noise with labels 0..B-1."""
    gen = torch.Generator().manual_seed(0)
    b = max(2, min(8, model.num_classes))
    x = torch.randn(b, model.in_channels, model.input_size, model.input_size, generator=gen)
    y = torch.arange(b) % model.num_classes
    out = {}
    for t in (0, 250, 500, 750, 999):
        tt = torch.full((b,), t, dtype=torch.long)
        ours, theirs = model(x, tt, y), exported(x, tt, y)
        out[str(t)] = float((ours - theirs).abs().max() / ours.abs().max())
    shifted = copy.deepcopy(model)
    shifted.t_embedder.freq_shift = 1.0
    tt = torch.full((b,), 500, dtype=torch.long)
    out["same_weights_shift_1_vs_export_max_abs"] = float((shifted(x, tt, y) - exported(x, tt, y)).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 5000])
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=None, help="default: the checkpoint's")
    parser.add_argument("--networks", nargs="+", default=["ditkit", "diffusers export"],
                        choices=["ditkit", "diffusers export"], help="which networks to sample (default both)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/results/diffusers_export_shift.json")
    args = parser.parse_args()
    from diffusers import DiTTransformer2DModel

    pipe = ImagePipeline.from_checkpoint(args.ckpt, device="cpu", precision="fp32")
    model = pipe.model
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_diffusers(model, Path(tmp) / "t", allow_lossy=True)
        transformer = DiTTransformer2DModel.from_pretrained(Path(tmp) / "t").eval()
    exported = DiffusersAdapter(transformer, model).eval()
    record: dict = {
        "checkpoint": str(pipe.checkpoint.dir), "machine": machine(), "num_samples": args.num_samples,
        "seeds": args.seeds, "timestep_freq_shift": float(model.t_embedder.freq_shift),
        "export_warnings": [str(w.message) for w in caught],
        "call_relative_max_difference": call_differences(model, exported),
    }
    print(json.dumps(record["call_relative_max_difference"], indent=2), flush=True)
    evaluator = build_evaluator(pipe.cfg, device="cpu", verbose=True)
    cfg_scales = args.cfg_scales or [pipe.cfg.sample.cfg_scale]
    rows = []
    for cfg_scale in cfg_scales:
        for name, network in (("ditkit", model), ("diffusers export", exported)):
            if name not in args.networks:
                continue
            pipe.model = network
            for seed in args.seeds:
                t0 = time.time()
                res = evaluate_generator(pipe, evaluator, args.num_samples, cfg_scale=cfg_scale, seed=seed,
                                         batch_size=args.batch_size)
                m, s = res["metrics"], res["sampling"]
                row = {"network": name, "cfg_scale": cfg_scale, "seed": seed, "sampler": s["sampler"],
                       "num_sampling_steps": s["num_sampling_steps"], "FD": m["fd_classifier"],
                       "precision": m["precision"], "recall": m["recall"], "accuracy": m["conditional_accuracy"],
                       "seconds": round(time.time() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                record["rows"] = rows
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for cfg_scale in cfg_scales:
        for name in args.networks:
            sel = [r for r in rows if r["network"] == name and r["cfg_scale"] == cfg_scale]
            fd = [r["FD"] for r in sel]
            acc = [r["accuracy"] for r in sel]
            print(f"cfg {cfg_scale:g} {name:17s} FD {statistics.mean(fd):7.2f} (range {min(fd):.2f}-{max(fd):.2f})  "
                  f"accuracy {statistics.mean(acc):.3f} (range {min(acc):.3f}-{max(acc):.3f})")


if __name__ == "__main__":
    main()

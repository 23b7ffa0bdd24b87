"""Sampling throughput: images/s for each sampler at its default step count, with guidance.

The model is built from a recipe's config with fresh weights (speed does not depend on the
weights); sampling goes through ditkit's ImagePipeline, the path `ditkit sample` takes.

    python benchmarks/sample_throughput.py                         # digits recipe, 40 images
    python benchmarks/sample_throughput.py --recipe shapes --num-images 16 --precision bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, print_table, write_json

from ditkit.recipes import get_recipe
from ditkit.builders import build_model
from ditkit.pipelines.image import ImagePipeline
from ditkit.train.precision import resolve_precision

# sampler -> default number of steps (docs/eval.md explains the choice)
GAUSSIAN = {"ddpm": 250, "ddim": 50, "dpm++": 25}
FLOW = {"euler": 50, "heun": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits")
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/sample_throughput.json")
    args = parser.parse_args()

    rows = []
    for kind, samplers in (("gaussian", GAUSSIAN), ("flow", FLOW)):
        cfg = get_recipe(args.recipe)
        cfg.objective.kind = kind
        if kind == "flow":
            cfg.objective.learn_sigma = False
        if cfg.data.num_classes is None:
            cfg.data.num_classes = 10
        cfg.data.channels = cfg.data.channels or 1
        dtype = resolve_precision(args.precision, torch.device("cpu"))
        pipe = ImagePipeline(build_model(cfg), cfg, dtype=dtype)
        labels = [i % cfg.data.num_classes for i in range(args.num_images)] if cfg.data.num_classes else None
        for sampler, steps in samplers.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    pipe(class_labels=labels, num_samples=args.num_images, sampler=sampler, num_inference_steps=steps,
                         guidance_scale=args.cfg_scale, seed=0, allow_untrained_uncond=True)
                times.append(time.perf_counter() - t0)
            best = sorted(times)[len(times) // 2]
            rows.append({"objective": kind, "sampler": sampler, "steps": steps, "cfg_scale": args.cfg_scale,
                         "seconds": best, "images_per_s": args.num_images / best,
                         "ms_per_step_per_image": 1000 * best / steps / args.num_images})
    print(f"recipe {args.recipe}, {args.num_images} images, precision {args.precision}, {machine()}")
    table = print_table(rows, ["objective", "sampler", "steps", "cfg_scale", "seconds", "images_per_s",
                               "ms_per_step_per_image"])
    write_json(args.json, {"machine": machine(), "args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()

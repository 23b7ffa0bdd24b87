"""Which prediction target and schedule let a small DiT reproduce a handful of 32-px scenes?
(docs/text_to_image.md, "Found: the objective, not the width".)

Eight ``shapes_captions`` scenes as eight classes, a class-conditional DiT (no prompts, no text
path), trained ``--steps`` steps of batch 32 (AdamW, lr 1e-3) for each prediction / schedule pair,
then sampled with DDIM-50 and x0 clipping to [-1, 1] as the pipelines sample pixel models. Prints
the mean squared error of each sample to the scene of its class and writes a picture per pair
(top row: the scenes, bottom row: the samples).

    OMP_NUM_THREADS=1 python benchmarks/overfit_objective.py --model DiT-T/4 --steps 1000 --out-dir OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from ditkit.data.captions import shapes_captions
from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.diffusion.schedules import make_schedule
from ditkit.models.dit import DIT_PRESETS, DiT
from ditkit.samplers.gaussian import ddim


def run(model_name: str, prediction: str, schedule: str, steps: int, size: int, seed: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean sample MSE, scenes (8, 3, S, S), samples (8, 3, S, S)) in [-1, 1]."""
    scenes = shapes_captions(num_items=8, image_size=size, seed=seed).images  # (8, 3, S, S) uint8
    x0 = scenes.float().div(127.5).sub(1)
    y = torch.arange(8)
    torch.manual_seed(seed)
    model = DiT(**{**DIT_PRESETS[model_name], "input_size": size, "in_channels": 3, "num_classes": 8,
                   "learn_sigma": False, "class_dropout_prob": 0.0})
    objective = GaussianDiffusion(make_schedule(schedule), prediction=prediction, clip_x0=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(0, 8, (32,))
        loss = objective.loss(model, x0[idx], y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        noise = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed))
        samples = objective.sample(ddim, lambda x, t: model(x, t, y), noise, 50).clamp(-1, 1)
    return float((samples - x0).pow(2).mean()), x0, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="DiT-T/4")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--pairs", nargs="+", default=["eps/cosine", "eps/linear", "v/cosine", "v/linear"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="overfit_objective")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in args.pairs:
        prediction, schedule = pair.split("/")
        start = time.perf_counter()
        mse, x0, samples = run(args.model, prediction, schedule, args.steps, args.image_size, args.seed)
        rows.append({"prediction": prediction, "schedule": schedule, "sample_mse": mse, "seconds": time.perf_counter() - start})
        print(f"{args.model} {pair}: sample MSE {mse:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
        grid = torch.cat([torch.cat(list(x0), 2), torch.cat(list(samples), 2)], 1)  # (3, 2S, 8S)
        pixels = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(out / f"{prediction}_{schedule}.png")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

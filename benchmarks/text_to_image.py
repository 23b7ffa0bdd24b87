"""Text-to-image on shapes_captions at equal wall clock: cross-attention DiT (PixArt-alpha) vs MMDiT
(SD3) vs a class-conditional DiT whose classes are the training captions (the baseline that cannot
draw a combination it never saw).

    OMP_NUM_THREADS=1 python benchmarks/text_to_image.py --budget 180s --num-prompts 100

Each variant trains for the same ``--budget`` of training seconds on the same data (the
``shapes_captions`` recipe: 4,096 train-split scenes, batch 64, same optimiser), then draws one
image per evaluation prompt with the same sampler, steps and guidance, and the attribute judge
(``ditkit.eval.attributes``) scores them: per-prompt success in-distribution and on held-out
combinations, per-axis accuracy, FD (judge features), images/s at sampling. The class baseline
gets a class only for captions it trained on; an evaluation prompt without one counts as a
failure (it cannot be drawn). Results: ``--out-dir/results.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ditkit.data.captions import shapes_captions
from ditkit.data.images import ImageDataset
from ditkit.eval.attributes import FD_NAME, _fd, eval_scenes, evaluate_text_to_image, load_or_train_judge, score_images
from ditkit.pipelines import load
from ditkit.recipes import get_recipe
from ditkit.train.loop import train


def train_prompt_model(model: str, budget: str, out: Path) -> Path:
    cfg = get_recipe("shapes_captions")
    cfg.model.name, cfg.train.time_budget = model, budget
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(out), model.replace("/", "-"), False
    return train(cfg, log=lambda m: print(m, flush=True)).run_dir


def train_class_model(budget: str, out: Path) -> tuple[Path, dict[str, int]]:
    """DiT-T/4 with one class per distinct training caption (the canonical one of each scene)."""
    scenes = shapes_captions(4096, seed=0, split="train")
    captions = sorted({r["caption"] for r in scenes.records})
    index = {c: i for i, c in enumerate(captions)}
    labels = torch.tensor([index[r["caption"]] for r in scenes.records])
    data = ImageDataset(scenes.images, labels, len(captions), captions, "shapes_captions as caption classes")
    cfg = get_recipe("shapes_captions")
    cfg.model.name, cfg.model.class_dropout_prob = "DiT-T/4", 0.1
    cfg.data.dataset, cfg.data.num_items = "shapes", 4096  # recorded only: the data is passed in
    cfg.train.time_budget = budget
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(out), "class-DiT-T-4", False
    return train(cfg, dataset=data, log=lambda m: print(m, flush=True)).run_dir, index


def evaluate_class_model(run: Path, index: dict[str, int], judge, num_prompts: int, steps: int, scale: float) -> dict:
    pipe = load(run, device="cpu")
    results: dict = {}
    gen_all = []
    seconds, drawn = 0.0, 0
    for split in ("in_distribution", "held_out"):
        scenes = eval_scenes(split, num_prompts)
        known = [i for i, r in enumerate(scenes.records) if r["caption"] in index]
        images = torch.zeros(len(scenes.records), 3, 32, 32) - 1  # black: a prompt it cannot draw
        if known:
            t0 = time.perf_counter()
            out = pipe(class_labels=[index[scenes.records[i]["caption"]] for i in known], num_inference_steps=steps,
                       guidance_scale=scale, seed=0)
            seconds += time.perf_counter() - t0
            drawn += len(known)
            images[known] = out.tensors
            gen_all.append(judge.features(out.tensors).numpy())
        results[split] = score_images(judge, images, scenes.records)
        results[split]["prompts_with_a_class"] = len(known)
    ref = shapes_captions(max(drawn, 2), seed=20_000, split="all", num_captions=1).pixels()
    if gen_all:
        results[FD_NAME] = _fd(np.concatenate(gen_all), judge.features(ref).numpy())
    results["images_per_second"] = drawn / seconds if seconds else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="180s", help="training seconds per variant (train.time_budget)")
    parser.add_argument("--num-prompts", type=int, default=100, help="evaluation prompts per split")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--out-dir", default="benchmarks/results/text_to_image")
    parser.add_argument("--variants", default="cross,mmdit,class")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_or_train_judge(image_size=32, log=print)
    table = {}
    for variant in args.variants.split(","):
        if variant == "class":
            run, index = train_class_model(args.budget, out)
            table[variant] = evaluate_class_model(run, index, judge, args.num_prompts, args.steps, args.guidance_scale)
        else:
            model = {"cross": "T2I-CrossDiT-T/4", "mmdit": "T2I-MMDiT-T/4"}[variant]
            run = train_prompt_model(model, args.budget, out)
            table[variant] = evaluate_text_to_image(load(run, device="cpu"), num_prompts=args.num_prompts,
                                                    num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                                    judge=judge)
        state = json.loads((sorted((run / "checkpoints").iterdir())[-1] / "config.json").read_text())
        table[variant]["model"] = state["model"]["name"]
        (out / "results.json").write_text(json.dumps({"budget": args.budget, "results": table}, indent=2) + "\n")
    print(f"| variant | in-dist success | held-out success | shape | colour | size | relation | {FD_NAME} | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, r in table.items():
        acc = r["in_distribution"]["accuracy"]
        cells = [f"{r['in_distribution']['success']:.3f}", f"{r['held_out']['success']:.3f}"] + [
            "-" if acc[k] is None else f"{acc[k]:.3f}" for k in ("shape", "colour", "size", "relation")]
        fd = r.get(FD_NAME)
        ips = r.get("images_per_second")
        print(f"| {variant} ({r['model']}) | " + " | ".join(cells) + f" | {'-' if fd is None else f'{fd:.2f}'} | "
              f"{'-' if ips is None else f'{ips:.1f}'} |")


if __name__ == "__main__":
    main()

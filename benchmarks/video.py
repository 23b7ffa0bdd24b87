"""Video benchmark (issue 17): how Latte's cost grows with frames, and what temporal attention buys.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video.py --out-dir OUT                  # cost table only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video.py --out-dir OUT --budget 4m      # + quality at equal time

Three ways to model a clip, each as a ``Latte-T/4``-sized network (hidden 64, 4 blocks) on
``moving_digits`` (32 px, one digit, 4 directions, labels ``digit_direction``):

* ``interleaved``: Latte's spatial and temporal blocks alternating (the recipe's model);
* ``full``: every block attends over all F x N space-time tokens (CogVideoX-style);
* ``frames``: the image DiT (``DiT-T/4``) trained on single frames with the clip's label and
  sampled frame by frame (each frame its own seed): the floor for temporal coherence, since
  nothing ties the frames of a clip together. ``--frame-layout centred|lattice`` trains it on still
  digits instead (at the frame centre, or on patch-aligned places): what the frames' difficulty is.

Cost (``--frames 8 16 32``, batch ``--batch-size``): median seconds of one AdamW training step of
4 (one warm-up first), MACs of one forward pass per clip, and the activation memory of one step,
measured as the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``; the part
of memory that grows with the clip; deterministic, unlike RSS on a shared machine).

Quality (``--budget``): each way trained by the trainer for the same wall-clock budget (the
recipe's optimiser settings), then ``--num-samples`` clips of 8 frames scored by the video judges
(``ditkit.eval.video``): per-frame digit accuracy, identity consistency, direction accuracy, FD
(clip-judge features) with the real-vs-real floor. Writes ``OUT/video.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one core, comparable seconds

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("interleaved", "full", "frames")
OVERRIDES: dict[str, str] = {}  # --set KEY=VALUE: changes to the recipe every variant starts from


def variant_config(variant: str, frames: int, batch_size: int) -> Any:
    """The recipe ``moving_digits`` with the network of ``variant`` (an image DiT for ``frames``)."""
    from ditkit.recipes import get_recipe

    from ditkit.config import apply_overrides

    cfg = apply_overrides(get_recipe("moving_digits"), dict(OVERRIDES))
    cfg.data.num_frames, cfg.train.global_batch_size = frames, batch_size
    if variant == "frames":  # the image DiT of the recipe's size (Latte-XS/4 -> DiT-XS/4)
        cfg.model.name, cfg.model.attention = cfg.model.name.replace("Latte-", "DiT-"), None
        # the trainer gets the frames as its dataset (FrameDataset); the name only passes validation
        cfg.data.dataset, cfg.data.num_frames = "mnist", None
    else:
        cfg.model.attention = variant
    return cfg


def saved_bytes(fn: Any) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs (activation memory of a step)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def cost(variant: str, frames: int, batch_size: int, steps: int = 3) -> dict[str, Any]:
    """Step seconds, forward MACs per clip, saved activation bytes for one variant and clip length."""
    from ditkit.builders import build_model, build_objective
    from ditkit.device import autocast, resolve_precision
    from ditkit.models.dit import forward_macs
    from ditkit.models.latte import latte_forward_macs

    cfg = variant_config(variant, frames, batch_size)
    cfg.data.channels, cfg.data.num_classes = 1, 40
    torch.manual_seed(0)
    model, objective = build_model(cfg).train(), build_objective(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = resolve_precision("auto", torch.device("cpu"))
    if variant == "frames":  # a clip is F images of the batch
        x = torch.rand(batch_size * frames, 1, 32, 32) * 2 - 1
        y = torch.randint(0, 40, (batch_size,)).repeat_interleave(frames)
        macs = forward_macs(model) * frames
    else:
        x = torch.rand(batch_size, 1, frames, 32, 32) * 2 - 1
        y = torch.randint(0, 40, (batch_size,))
        macs = latte_forward_macs(model, frames, 32)

    def step() -> None:
        with autocast(torch.device("cpu"), dtype):
            loss = objective.loss(model, x, y).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = saved_bytes(step)  # also the warm-up step
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "frames": frames, "batch_size": batch_size, "step_s": round(statistics.median(times), 3),
            "gmacs_per_clip": round(macs / 1e9, 3), "saved_activation_mib": round(memory / 2**20, 1),
            "params": sum(p.numel() for p in model.parameters())}


FRAME_LAYOUTS = ("moving", "centred", "lattice")


class FrameDataset:
    """Single 32 x 32 frames with a ``digit_direction`` label: an image dataset for the trainer
    (``images``, ``labels``, ``num_classes``, ``class_names``, ``source``).

    ``layout``: ``moving`` (the recipe's clips cut into frames ``(N * F, 1, 32, 32)``, each with its
    clip's label), or a diagnostic of what makes those frames hard: each training-split digit once,
    at the clip's 14-pixel size, standing still ``centred`` in the frame, or on a ``lattice`` of 5 x 5
    places 4 pixels apart (whole patches of a /4 model), labelled ``digit * 4`` (direction 0)."""

    def __init__(self, num_items: int, layout: str = "moving") -> None:
        from ditkit.data.images import center_crop_resize
        from ditkit.data.video import _mnist_digits, make_moving_digits

        self.num_classes, self.channels, self.source = 40, 1, f"frames of moving_digits ({layout})"
        if layout == "moving":
            clips = make_moving_digits(num_items, 32, 8, 1, 4, "digit_direction", split="train")
            self.images = clips.clips.transpose(1, 2).reshape(-1, 1, 32, 32)  # (N * F, 1, 32, 32)
            self.labels = clips.labels.repeat_interleave(8)
            self.class_names = clips.class_names
            return
        pool, digits = _mnist_digits()
        train_split = torch.arange(pool.shape[0]) % 10 != 0  # make_moving_digits' split="train"
        glyphs = center_crop_resize(pool[train_split], 14)  # (P, 1, 14, 14): 7/16 of the frame, as the clips
        self.images = torch.zeros(glyphs.shape[0], 1, 32, 32, dtype=torch.uint8)
        corners = torch.randint(0, 5, (glyphs.shape[0], 2), generator=torch.Generator().manual_seed(0)) * 4
        for i, glyph in enumerate(glyphs):
            x, y = (9, 9) if layout == "centred" else (int(corners[i, 0]), int(corners[i, 1]))
            self.images[i, :, y:y + 14, x:x + 14] = glyph
        self.labels = digits[train_split].to(torch.int64) * 4
        self.class_names = [f"{d} {k}" for d in range(10) for k in range(4)]

    def __len__(self) -> int:
        return self.images.shape[0]


def frames_as_clips(pipe: Any, labels: list[int], num_frames: int, steps: int, seed: int) -> torch.Tensor:
    """The image pipeline asked for each frame separately (label repeated, seeds seed + i): (N, 1, F, H, W)."""
    repeated = [label for label in labels for _ in range(num_frames)]
    out = pipe(class_labels=repeated, num_inference_steps=steps, seed=seed, batch_size=128)
    n, (c, h, w) = len(labels), out.tensors.shape[1:]
    return out.tensors.view(n, num_frames, c, h, w).transpose(1, 2)


def quality(variant: str, budget: str, out_dir: Path, num_samples: int, cache: Path,
            frame_layout: str = "moving") -> dict[str, Any]:
    """Train ``variant`` for ``budget`` and score ``num_samples`` clips with the judges (the
    ``frames`` variant on ``FrameDataset(layout=frame_layout)``: other layouts than ``moving`` are
    scored on their digits only, since their frames neither move nor look like the clips)."""
    import ditkit
    from ditkit.data.video import make_moving_digits
    from ditkit.eval.video import (VideoJudgeConfig, clip_frechet_distance, evaluate_video, get_video_judges,
                                   requested_attributes, score_clips)
    from ditkit.train.loop import train

    cfg = variant_config(variant, 8, 16)
    cfg.train.time_budget, cfg.train.sample_every, cfg.train.max_steps = budget, 0, None
    cfg.run.results_dir, cfg.run.run_name = str(out_dir / "runs"), variant
    if variant == "frames":
        cfg.train.global_batch_size = 128  # 16 clips' worth of frames per step
        result = train(cfg, dataset=FrameDataset(cfg.data.num_items, frame_layout), log=lambda m: None)
    else:
        result = train(cfg, log=lambda m: None)
    pipe = ditkit.load(result.run_dir, device="cpu")
    steps = pipe.cfg.sample.num_sampling_steps
    row: dict[str, Any] = {"variant": variant, "train_steps": result.step, "train_s": round(result.train_s, 1)}
    if variant != "frames":
        report = evaluate_video(pipe, num_samples, cache_dir=cache)
        return {**row, **report["metrics"], "fd_real_vs_real": report["real"]["fd_real_vs_real"]}
    judges = get_video_judges(cache, VideoJudgeConfig())
    labels = [i % 40 for i in range(num_samples)] if frame_layout == "moving" else [(i % 10) * 4 for i in range(num_samples)]
    clips = frames_as_clips(pipe, labels, 8, steps, pipe.cfg.sample.seed)
    digits, directions = requested_attributes(labels, "digit_direction", 4)
    if frame_layout != "moving":
        row["frame_layout"] = frame_layout
        return {**row, **{k: round(v, 4) for k, v in score_clips(judges, clips, digits).items()}}
    scores = score_clips(judges, clips, digits, directions)
    common = dict(image_size=32, num_frames=8, num_directions=4, label="digit_direction", split="test")
    reference, second = make_moving_digits(num_samples, seed=1, **common), make_moving_digits(num_samples, seed=2, **common)
    scores["fd_clip_judge"] = clip_frechet_distance(judges, clips, reference.clips)
    scores["fd_real_vs_real"] = clip_frechet_distance(judges, second.clips, reference.clips)
    return {**row, **{k: round(v, 4) for k, v in scores.items()}}


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--budget", help="train each variant this long (e.g. 4m) and score it; default: cost only")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--cache-dir", type=Path, default=None, help="video judges cache (default ~/.cache/ditkit/eval)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every variant, e.g. model.name=Latte-T/2 (the frames variant "
                             "takes the DiT of the same size)")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost table (quality only)")
    parser.add_argument("--frame-layout", choices=FRAME_LAYOUTS, default="moving",
                        help="frames variant: the clips' frames (moving), or each digit once, still, centred or on a "
                             "patch-aligned lattice (a diagnostic of what makes the frames hard)")
    args = parser.parse_args()
    from ditkit.config import parse_set_option

    OVERRIDES.update(dict(parse_set_option(item) for item in args.set))
    from ditkit.cache import cache_dir

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "set": OVERRIDES, "cost": [], "quality": []}
    for variant in ([] if args.no_cost else args.variants):
        for frames in args.frames:
            results["cost"].append(cost(variant, frames, args.batch_size))
            print(json.dumps(results["cost"][-1]), flush=True)
    if args.budget:
        for variant in args.variants:
            results["quality"].append(quality(variant, args.budget, args.out_dir, args.num_samples,
                                              args.cache_dir or cache_dir("eval"), args.frame_layout))
            print(json.dumps(results["quality"][-1]), flush=True)
    (args.out_dir / "video.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "## Cost as frames grow\n\n" + table(results["cost"], ["variant", "frames", "batch_size", "step_s",
                                                                    "gmacs_per_clip", "saved_activation_mib", "params"])
    if results["quality"]:
        text += f"\n\n## Quality at equal wall clock ({args.budget} each)\n\n" + table(results["quality"], [
            "variant", "train_steps", "frame_accuracy", "identity_consistency", "direction_accuracy", "fd_clip_judge",
            "fd_real_vs_real"])
    (args.out_dir / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

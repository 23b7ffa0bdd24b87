"""AudioDiT (frames as tokens) against the class-conditional image DiT on the same spectrograms as
2-D images (issue 18's comparison).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/audio_vs_image_dit.py --budget 6m --out-dir benchmarks/results/audio_vs_image

Both models train on the same built-in ``spoken_digits`` log-mels (64 mel bins x 64 frames, 1 s at
16 kHz, normalised to [-1, 1]) with the recipe's objective, optimiser, batch and warmup-stable-decay
schedule, for the same wall-clock ``--budget``, **at the same time** (two processes of one thread
each, so both see the same machine load; the steps each reached are reported). The models:

* ``audio``: the recipe's AudioDiT-XS/2 with 4 blocks (width 192): a clip is 32 tokens of 2 frames
  x 64 mel bins (a 1-D sequence along time, as Stable Audio / F5-TTS).
* ``image_pP``: ditkit's DiT (Peebles & Xie 2023) with the same width, depth and heads on the
  spectrogram as a 1 x 64 x 64 image, for each patch P of ``--image-patches`` (4: 256 tokens of
  4 x 4 cells; 8: 64 tokens of 8 x 8 cells).

Then each samples ``--num-samples`` clips (labels cycling over the digits, seed i for clip i) with
the recipe's sampler (DDPM 50, guidance 5), played back by the same Griffin-Lim vocoder and scored
by the same judges (``ditkit.eval.audio.audio_report``: pocketsphinx ten-digit accuracy, the log-mel
classifier's accuracy, FD in its features with the real-vs-real floor).

Writes ``OUT/comparison.json`` and ``OUT/table.md``; the two runs stay in ``OUT/runs``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


class SpectrogramImages:
    """The spoken-digit log-mels as a 1-channel image dataset for ``train(cfg, dataset=...)``:
    ``images`` (N, 1, n_mels, frames) uint8 (the trainer maps them to [-1, 1]), labels, classes."""

    def __init__(self, mels: Any) -> None:
        self.images = mels.images[:, None].contiguous()
        self.labels, self.num_classes, self.class_names = mels.labels, mels.num_classes, mels.class_names
        self.source, self.channels = f"{mels.source} as 2-D images", 1

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def describe(self) -> str:
        n, c, h, w = self.images.shape
        return f"{self.source} ({n} spectrograms {h}x{w}, {self.num_classes} classes)"


def config(kind: str, budget: str, out_dir: Path) -> Any:
    from ditkit.config import ModelConfig
    from ditkit.recipes import get_recipe

    cfg = get_recipe("spoken_digits")
    cfg.train.time_budget, cfg.train.sample_every, cfg.train.eval_every, cfg.train.log_every = budget, 0, 0, 20
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(out_dir / "runs"), kind, False
    if kind.startswith("image_p"):
        image_patch = int(kind[len("image_p"):])
        # The image DiT with the audio model's width, depth and heads (AudioDiT-XS: 192, 4 of 6 blocks, 4 heads).
        cfg.model = ModelConfig(name=f"DiT-S/{image_patch}", hidden_size=192, depth=4, num_heads=4, class_dropout_prob=0.1)
        cfg.recipe = None
    return cfg


def train_one(kind: str, budget: str, out_dir: Path) -> None:
    """One model's training (run in its own process by ``main``)."""
    from ditkit.data.audio import load_audio_dataset
    from ditkit.train.loop import train

    cfg = config(kind, budget, out_dir)
    dataset = SpectrogramImages(load_audio_dataset(cfg.data)) if kind != "audio" else None
    result = train(cfg, dataset=dataset, log=lambda m: print(f"[{kind}] {m}", file=sys.stderr, flush=True))
    print(json.dumps({"run_dir": str(result.run_dir)}))


def score(kind: str, run_dir: Path, num_samples: int, cache: str) -> dict[str, Any]:
    """Sample, vocode and judge ``num_samples`` clips of one run."""
    import ditkit
    from ditkit.checkpoint_io import Checkpoint
    from ditkit.data.audio import load_audio_dataset, logmel_to_waveform, mel_spec_of
    from ditkit.eval.audio import audio_report, get_mel_classifier

    ckpt = Checkpoint.open(run_dir)
    cfg = ckpt.config
    labels = [i % 10 for i in range(num_samples)]
    spec = mel_spec_of(cfg.data)
    pipe = ditkit.load(str(run_dir), device="cpu")
    start = time.process_time()
    if kind == "audio":
        out = pipe(class_labels=labels, duration=cfg.data.duration, seed=0, batch_size=100)
        waves = out.waveforms
    else:  # the image pipeline's tensors (N, 1, 64, 64) in [-1, 1] are normalised log-mels
        out = pipe(class_labels=labels, seed=0, batch_size=100)
        waves = logmel_to_waveform(out.tensors[:, 0].float(), spec, n_iter=32)
    cpu_s = time.process_time() - start
    real = load_audio_dataset(cfg.data)
    real_logmels = real.images.float() / 127.5 - 1.0
    classifier = get_mel_classifier(real_logmels, real.labels, cache, num_classes=10)
    report = audio_report(waves, torch.tensor(labels), spec, classifier=classifier, real_logmels=real_logmels, seed=0)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_lines = [m for m in metrics if "loss" in m]
    report.update({
        "model": cfg.model.name, "params": sum(p.numel() for p in pipe.model.parameters()),
        "steps": ckpt.step, "final_loss": train_lines[-1]["loss"] if train_lines else None,
        "train_s": train_lines[-1].get("train_s") if train_lines else None,
        "sampling_cpu_s": cpu_s, "sampler": pipe.cfg.sample.sampler,
        "num_sampling_steps": pipe.cfg.sample.num_sampling_steps, "cfg_scale": pipe.cfg.sample.cfg_scale,
    })
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="6m", help="training time of each model (they train at the same time)")
    parser.add_argument("--image-patches", default="4,8", help="patch sizes of the image DiTs (64 must divide by each)")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--out-dir", default="benchmarks/results/audio_vs_image")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--train-only", help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--score-only", action="store_true", help="score the runs already in OUT/runs")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    if args.train_only:
        train_one(args.train_only, args.budget, out_dir)
        return 0
    kinds = ["audio"] + [f"image_p{int(p)}" for p in args.image_patches.split(",")]
    from ditkit.cache import cache_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    if not args.score_only:
        children = {kind: subprocess.Popen([sys.executable, __file__, "--train-only", kind, "--budget", args.budget,
                                            "--out-dir", str(out_dir)], stdout=subprocess.PIPE, text=True) for kind in kinds}
        for kind, child in children.items():
            child.communicate()
            if child.returncode != 0:
                print(f"training {kind} failed (exit {child.returncode})", file=sys.stderr)
                return 1
    cache = args.cache_dir or str(cache_dir("eval"))
    rows = {kind: score(kind, out_dir / "runs" / kind, args.num_samples, cache) for kind in kinds}
    result = {"budget": args.budget, "load_average_at_start": load, "num_samples": args.num_samples, "rows": rows}
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=2))
    lines = ["| model | tokens | params | steps in budget | final loss | pocketsphinx | classifier | FD (floor) | sampling CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        tokens = 32 if kind == "audio" else (64 // int(kind[len("image_p"):])) ** 2
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(f"| {r['model']} ({kind}) | {tokens} | {r['params'] / 1e6:.2f} M | {r['steps']} | {loss} | "
                     f"{r['pocketsphinx_accuracy']:.3f} | {r['classifier_accuracy']:.3f} | {r['fd_classifier']:.1f} "
                     f"({r['fd_real_floor']:.1f}) | {r['sampling_cpu_s']:.0f} |")
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

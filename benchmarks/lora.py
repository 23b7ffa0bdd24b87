"""LoRA vs full fine-tuning vs from scratch on held-out digit classes (issue 19).

    OMP_NUM_THREADS=1 python benchmarks/lora.py                         # what docs/lora.md reports
    OMP_NUM_THREADS=1 python benchmarks/lora.py --pretrain-budget 20m --adapt-budget 5m

1. Pretrain a class-conditional DiT on the sklearn digits (16x16) with classes 8 and 9 held out
   (``--pretrain-budget`` of training time; the label table has 10 rows, rows 8 and 9 never train).
2. Adapt it to the held-out classes (all their ~360 images) for the same training time each
   (``--adapt-budget``): full fine-tuning (``--init-from``), LoRA rank 4 / 16 / 64 (``--init-from
   --lora-rank R`` on attention + MLP + adaLN, learning rate 3e-3 against 1e-3), one LoRA r16 on
   attention + MLP only, one LoRA r16 that also trains the class-label table whole
   (``--lora-train-modules labels``: the new classes' rows never trained in pretraining), and from
   scratch (``VARIANTS``).
   Each variant runs in its own process, so its peak resident memory is its own.
3. Score each result with the digits feature classifier (trained on all 10 classes, cached): FD of
   classifier features and conditional accuracy on the new classes (``--num-samples`` vs the real 8s and
   9s), and on the old classes (``--num-samples`` vs the real 0-7) to measure forgetting against the
   pretrained model. Sampling: the recipe's DDPM at guidance 1.25, ``--sampling-steps`` steps, fixed seeds.

The model is a 3-block DiT of width 384 (DiT-S/4 with depth 3): at width 384 a rank-16 adapter on
attention + MLP is 3.7% of the weights (16 x 16 x h / (18 h^2)); with adaLN too, 5.3%. Writes
OUT/results.json and prints the table docs/lora.md shows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = (8, 9)


@dataclass
class Variant:
    name: str
    init: bool  # from the pretrained run
    lora_rank: int = 0
    targets: str = "attn,mlp,adaLN"
    lr: float = 1e-3
    train_modules: str = ""  # --lora-train-modules: whole modules trained beside the adapters


VARIANTS = {v.name: v for v in [
    Variant("full", True),
    Variant("lora4", True, 4, lr=3e-3),
    Variant("lora16", True, 16, lr=3e-3),
    Variant("lora64", True, 64, lr=3e-3),
    Variant("lora16_attn_mlp", True, 16, targets="attn,mlp", lr=3e-3),
    Variant("lora16_labels", True, 16, lr=3e-3, train_modules="labels"),
    Variant("lora16_attn_mlp_labels", True, 16, targets="attn,mlp", lr=3e-3, train_modules="labels"),
    Variant("scratch", False),
]}


def _config(run_name: str, out: Path, budget: str, lr: float):
    from ditkit.recipes import get_recipe

    cfg = get_recipe("digits")
    cfg.model.name, cfg.model.depth = "DiT-S/4", 3
    cfg.data.num_classes = 10
    cfg.run.results_dir, cfg.run.run_name = str(out), run_name
    cfg.run.tensorboard = False
    t = cfg.train
    t.time_budget, t.max_steps, t.epochs = budget, None, None
    t.global_batch_size, t.lr, t.warmup_steps = 64, lr, 20
    t.ckpt_every, t.sample_every, t.eval_every, t.log_every = 10**9, 0, 0, 50
    # EMA and objective are the digits recipe's (0.99 without warm-up; v prediction, linear schedule):
    # under the earlier eps / cosine recipe with EMA 0.995 the 10-minute pretrain sampled its own
    # classes at 17% accuracy, which left nothing to adapt or to forget.
    t.compile, t.precision = False, "fp32"
    return cfg


def _digits(keep: tuple[int, ...]):
    """The digits as an ImageDataset restricted to the classes ``keep`` (labels unchanged, 10 rows)."""
    from ditkit.config import DataConfig
    from ditkit.data import load_dataset
    from ditkit.data.images import ImageDataset

    full = load_dataset(DataConfig(dataset="digits", image_size=16, num_classes=10))
    mask = torch.isin(full.labels, torch.tensor(keep))
    return ImageDataset(full.images[mask], full.labels[mask], 10, full.class_names, f"digits classes {keep}"), full


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pretrain(out: Path, budget: str) -> Path:
    from ditkit.train.loop import train

    run = out / "pretrain"
    if (run / "checkpoints").is_dir():
        return run
    data, _ = _digits(tuple(c for c in range(10) if c not in HELD_OUT))
    result = train(_config("pretrain", out, budget, 1e-3), dataset=data)
    print(f"pretrained {result.step} steps in {result.train_s:.0f} s of training", file=sys.stderr)
    return result.run_dir


def adapt(out: Path, name: str, budget: str) -> dict:
    """One variant, in this process: train, then report what it cost (the scores come later)."""
    from ditkit.checkpoint_io import latest_checkpoint
    from ditkit.train.loop import train

    v = VARIANTS[name]
    data, _ = _digits(HELD_OUT)
    cfg = _config(name, out, budget, v.lr)
    if v.init:
        cfg.train.init_from = str(out / "pretrain")
    cfg.train.lora_rank, cfg.train.lora_targets = v.lora_rank, v.targets
    cfg.train.lora_train_modules = v.train_modules
    rss_before = _rss_mib()
    result = train(cfg, dataset=data)
    ckpt = latest_checkpoint(result.run_dir)
    from ditkit.pipelines import load

    pipe = load(result.run_dir, device="cpu")
    # the adapter: LoRA factors and its trained copies of whole modules (".modules_to_save.<name>.")
    adapter = {n: p.numel() for n, p in pipe.model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    total = sum(p.numel() for n, p in pipe.model.named_parameters() if n not in adapter)
    if v.lora_rank:
        trainable = sum(adapter.values())
        file = ckpt / "ema_adapter" / "adapter_model.safetensors"
    else:
        trainable = total
        file = ckpt / "ema.safetensors"
    return dict(
        variant=name, steps=result.step, train_s=result.train_s, s_per_step=result.train_s / max(1, result.step),
        trainable=trainable, base_params=total, trainable_fraction=trainable / total,
        file_bytes=file.stat().st_size, peak_rss_mib=_rss_mib(), rss_before_mib=rss_before,
        # what training holds beyond the frozen weights: gradients and two Adam moments per trainable weight
        grad_adam_mib=trainable * 4 * 3 / 2**20, lr=v.lr, targets=v.targets if v.lora_rank else "",
        train_modules=v.train_modules, whole_module_params=sum(n for k, n in adapter.items() if ".modules_to_save." in k),
    )


def score(out: Path, runs: dict[str, Path], num_samples: int, seed: int, steps: int) -> dict[str, dict]:
    """FD (classifier features) and conditional accuracy, new classes and old classes, per run."""
    from ditkit.eval.classifier import conditional_accuracy, get_classifier
    from ditkit.eval.frechet import feature_stats, frechet_distance
    from ditkit.pipelines import load

    _, full = _digits(tuple(range(10)))
    classifier, _ = get_classifier(full.images, full.labels, out / "classifier", num_classes=10)
    real = {}
    for group, classes in (("new", HELD_OUT), ("old", tuple(c for c in range(10) if c not in HELD_OUT))):
        mask = torch.isin(full.labels, torch.tensor(classes))
        real[group] = (feature_stats(classifier.features(full.images[mask]).numpy()), classes)
    scores = {}
    for name, run in runs.items():
        pipe = load(run, device="cpu")
        row = {}
        for group, (stats, classes) in real.items():
            labels = [classes[i % len(classes)] for i in range(num_samples)]
            images = pipe(class_labels=labels, num_inference_steps=steps, seed=seed).tensors  # the recipe's DDPM, cfg 1.25
            mu, sigma = feature_stats(classifier.features(images).numpy())
            row[f"fd_{group}"] = frechet_distance(mu, sigma, *stats)
            row[f"acc_{group}"] = conditional_accuracy(classifier, images, torch.tensor(labels))
        scores[name] = row
        print(f"scored {name}: {row}", file=sys.stderr)
    return scores


def table(results: dict) -> str:
    base = results["scores"]["pretrain"]
    lines = [
        "| variant | trainable (fraction) | file | peak RSS | grads+Adam | s/step | steps | FD new | acc new | FD old (forgetting) | acc old |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| pretrained (no 8, 9) | - | - | - | - | - | - | {base['fd_new']:.1f} | {base['acc_new']:.2f} | "
        f"{base['fd_old']:.1f} | {base['acc_old']:.2f} |",
    ]
    for name, cost in results["costs"].items():
        s = results["scores"][name]
        trained = cost["targets"] + (f" + {cost['train_modules']}" if cost.get("train_modules") else "")  # + whole modules
        what = name + (f" ({trained})" if trained else "")
        lines.append(
            f"| {what} | {cost['trainable'] / 1e6:.3f}M ({100 * cost['trainable_fraction']:.1f}%) | "
            f"{cost['file_bytes'] / 2**20:.2f} MiB | {cost['peak_rss_mib']:.0f} MiB | {cost['grad_adam_mib']:.1f} MiB | "
            f"{cost['s_per_step']:.3f} | {cost['steps']} | {s['fd_new']:.1f} | {s['acc_new']:.2f} | "
            f"{s['fd_old']:.1f} ({s['fd_old'] - base['fd_old']:+.1f}) | {s['acc_old']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lora"))
    parser.add_argument("--pretrain-budget", default="10m")
    parser.add_argument("--adapt-budget", default="120s")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=100, help="samples per group (new classes, old classes)")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDPM steps (the recipe's sampler and guidance)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--adapt", help=argparse.SUPPRESS)  # internal: one variant in a child process
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.adapt:
        print(json.dumps(adapt(out, args.adapt, args.adapt_budget)))
        return 0
    t0 = time.time()
    pretrain(out, args.pretrain_budget)
    costs = {}
    for name in args.variants.split(","):
        done = out / f"{name}.cost.json"
        if not done.is_file():
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--adapt", name, "--adapt-budget",
                                   args.adapt_budget], stdout=subprocess.PIPE, text=True, check=True)
            done.write_text(proc.stdout.strip().splitlines()[-1])
        costs[name] = json.loads(done.read_text())
        print(f"{name}: {costs[name]}", file=sys.stderr)
    runs = {"pretrain": out / "pretrain", **{name: out / name for name in costs}}
    results = {"costs": costs, "scores": score(out, runs, args.num_samples, args.seed, args.sampling_steps),
               "settings": vars(args), "wall_s": time.time() - t0, "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

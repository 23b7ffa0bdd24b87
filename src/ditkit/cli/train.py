"""``ditkit train``: a recipe (or a config.json) plus flag overrides -> one run of the trainer;
``--resume RUN`` continues a run exactly where it stopped."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

from ditkit.config import DIT_FLAGS, Config, ConfigError, apply_overrides, load_config, parse_set_option
from ditkit.registry import COMMANDS

__all__ = ["register", "train_config", "cmd_train"]


@COMMANDS.register("train", order=10, summary="train a DiT (or resume a run)")
def register(subparsers: Any) -> None:
    tr = subparsers.add_parser("train", help="train a DiT (or resume a run)",
                               description="Train a DiT on images or text from a recipe, a config.json, or a run to resume.")
    tr.add_argument("--recipe", help="start from a named recipe (default: digits); see --list-recipes")
    tr.add_argument("--config", help="start from a config.json instead of a recipe")
    tr.add_argument("--resume", metavar="RUN_OR_CKPT", help="continue a run directory (newest checkpoint) or a checkpoint")
    tr.add_argument("--stop-at-step", type=int, metavar="K", help="save and stop at step K (resume later)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config value")
    tr.add_argument("--print-config", action="store_true", help="print the final config as JSON and exit")
    tr.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    S = argparse.SUPPRESS  # only flags that are given override the recipe
    tr.add_argument("--data", "--data-path", dest="data", default=S, metavar="PATH_OR_NAME",
                    help="image folder, .npz/.npy file, or built-in dataset: digits, shapes, mnist; text recipes: "
                         ".txt/.jsonl file, folder of .txt, or pydoc, synthetic-sums, synthetic-brackets, synthetic")
    tr.add_argument("--model", default=S, help="model preset, e.g. DiT-S/2, DiT-XS/4, DiT-T/4, TextDiT-T")
    tr.add_argument("--image-size", type=int, default=S)
    tr.add_argument("--num-classes", type=int, default=S, help="0 trains unconditionally")
    tr.add_argument("--global-batch-size", type=int, default=S)
    tr.add_argument("--global-seed", type=int, default=S)
    tr.add_argument("--epochs", type=int, default=S)
    tr.add_argument("--max-steps", type=int, default=S)
    tr.add_argument("--time-budget", default=S, metavar="DURATION",
                    help="stop after this much training time (90s, 10m, 1.5h), checkpoint saved")
    tr.add_argument("--lr", type=float, default=S)
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=S)
    tr.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N")
    tr.add_argument("--log-every", type=int, default=S)
    tr.add_argument("--ckpt-every", type=int, default=S)
    tr.add_argument("--sample-every", type=int, default=S)
    tr.add_argument("--keep-last", type=int, default=S)
    tr.add_argument("--results-dir", default=S)
    tr.add_argument("--run-name", default=S)
    tr.add_argument("--vae", default=S, metavar="DIR", help="train on the latents of this local AutoencoderKL folder")
    tr.add_argument("--init-from", default=S, metavar="RUN_OR_FILE",
                    help="start from pretrained weights: a ditkit run, an official DiT .pt, a diffusers folder")
    tr.add_argument("--class-map", default=S, metavar="NEW:OLD,...", help="with --init-from: label rows to keep")
    tr.set_defaults(func=cmd_train, interrupted_message="aborted (the newest complete checkpoint is kept)")


def train_config(args: argparse.Namespace) -> tuple[Config, Optional[Path]]:
    """The config a train command asks for, and the checkpoint to resume (or None)."""
    from ditkit.checkpoint_io import Checkpoint
    from ditkit.recipes import get_recipe

    overrides: dict[str, Any] = {}
    for flag, key in DIT_FLAGS.items():
        if hasattr(args, flag):
            overrides[key] = getattr(args, flag)
    for item in args.set:
        key, value = parse_set_option(item)
        overrides[key] = value
    if "train.epochs" in overrides and "train.max_steps" not in overrides:
        overrides["train.max_steps"] = None  # asking for epochs replaces a recipe's step count

    ckpt = None
    if args.resume:
        if args.recipe or args.config:
            raise ConfigError("--resume takes the config from the checkpoint: drop --recipe/--config")
        from ditkit.train.loop import RESUMABLE_SECTIONS

        try:
            checkpoint = Checkpoint.open(args.resume)
        except ConfigError as err:
            raise ConfigError(str(err).replace("--ckpt", "--resume")) from None
        ckpt, cfg = checkpoint.dir, checkpoint.config
        fixed = [k for k in overrides if k.split(".")[0] not in RESUMABLE_SECTIONS]
        if fixed:
            raise ConfigError(
                f"cannot change {', '.join(fixed)} when resuming (only {', '.join(RESUMABLE_SECTIONS)} values); "
                "start a new run instead"
            )
    elif args.config:
        if args.recipe:
            raise ConfigError("give either --recipe or --config, not both")
        cfg = load_config(args.config)
    else:
        cfg = get_recipe(args.recipe or "digits")
    return apply_overrides(cfg, overrides), ckpt


def cmd_train(args: argparse.Namespace) -> int:
    from ditkit.cli import EXIT_INTERRUPTED

    if args.list_recipes:
        from ditkit.registry import RECIPES

        for entry in RECIPES.entries():
            print(f"{entry.name:24s} {entry.summary}")
        return 0
    from ditkit.train.loop import preflight, train

    cfg, ckpt = train_config(args)
    preflight(cfg)
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ConfigError(f"--stop-at-step {args.stop_at_step}: must be at least 1")
    if args.print_config:
        print(cfg.to_json(), end="")
        return 0
    result = train(cfg, resume=ckpt, stop_at_step=args.stop_at_step)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return EXIT_INTERRUPTED if result.interrupted else 0
    print(f"run: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    loss = "-" if result.loss is None else f"{result.loss:.5f}"
    print(f"steps: {result.step}  loss: {loss}  wall time: {result.wall_time_s:.1f} s")
    samples = sorted((result.run_dir / "samples").glob("step_*")) if (result.run_dir / "samples").is_dir() else []
    if samples:
        print(f"samples: {samples[-1]}")
    return EXIT_INTERRUPTED if result.interrupted else 0

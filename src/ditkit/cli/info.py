"""``ditkit info RUN_OR_CKPT``: a checkpoint's config and facts (``--json`` for one JSON object)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_info"]


@COMMANDS.register("info", order=30, summary="describe a run or checkpoint: config, parameters, step, data")
def register(subparsers: Any) -> None:
    inf = subparsers.add_parser("info", help="describe a run or checkpoint: config, parameters, step, data",
                                description="Print a checkpoint's config and facts.")
    inf.add_argument("path", metavar="RUN_OR_CKPT", help="a run directory (its newest checkpoint) or a checkpoint")
    inf.add_argument("--json", action="store_true", help="one JSON object instead of text")
    inf.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from ditkit.checkpoint_io import Checkpoint, list_checkpoints

    ckpt = Checkpoint.open(args.path)
    cfg = ckpt.config
    step, epoch, num_params = ckpt.facts["step"], ckpt.facts["epoch"], ckpt.facts["num_params"]
    facts = {
        "checkpoint": str(ckpt.dir),
        "step": step,
        "epoch": epoch,
        "model": cfg.model.name,
        "parameters": num_params,
        "modality": cfg.modality,
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "num_classes": cfg.data.num_classes,
        "class_names": cfg.data.class_names,
        "objective": cfg.objective.kind,
        "checkpoints": [p.name for p in list_checkpoints(ckpt.run_dir)],
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"checkpoint   {facts['checkpoint']}")
    print(f"step         {step} (epoch {epoch})")
    print(f"model        {cfg.model.name}, {num_params:,} parameters ({num_params / 1e6:.2f}M)")
    shape = (f"{cfg.data.seq_len} tokens, {cfg.data.tokenizer} vocabulary {cfg.data.vocab_size}" if cfg.modality == "text"
             else f"{cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels}")
    names = f" ({', '.join(cfg.data.class_names)})" if cfg.data.class_names else ""
    print(f"data         {cfg.data.dataset}: {shape}, {cfg.data.num_classes or 'no'} classes{names}")
    print(f"objective    {cfg.objective.kind}" + (f" ({cfg.objective.prediction}, {cfg.objective.schedule}, "
          f"learn_sigma={cfg.objective.learn_sigma})" if cfg.objective.kind == "gaussian" else f" ({cfg.objective.time_sampling})"))
    print(f"checkpoints  {', '.join(facts['checkpoints']) or '-'}")
    print("config:")
    print(cfg.to_json(), end="")
    return 0

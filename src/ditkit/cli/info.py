"""``ditkit info RUN_OR_CKPT``: a checkpoint's config and facts (``--json`` for one JSON object)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_info", "unconditional_branch"]


def unconditional_branch(cfg: Any) -> dict[str, Any]:
    """Whether classifier-free guidance's unconditional branch was trained, from the config alone.

    The label dropout a run trained with is ``class_dropout_prob`` after the preset and the
    constructor defaults (``ditkit.builders.model_kwargs``, then the model class's default), so a
    config that leaves ``model.class_dropout_prob`` unset reports the value the network really used.
    Prompt models report ``data.caption_dropout`` (captions dropped to the empty prompt) instead.
    Returns ``{"trained": True | False | None, "class_dropout_prob" (or "caption_dropout"): float |
    None, "text": str}``; ``trained`` is None for models without class labels (nothing to guide
    against) and for model families that take no label dropout.
    """
    import inspect

    from ditkit.builders import model_family, model_kwargs
    from ditkit.config import ConfigError
    from ditkit.registry import MODEL_FAMILIES

    family = model_family(cfg)
    if family in ("prompt_dit", "prompt_latte"):  # prompt models: captions dropped to the empty prompt (data.caption_dropout)
        prob = float(cfg.data.caption_dropout)
        trained = prob > 0
        return {"trained": trained, "caption_dropout": prob,
                "text": f"trained (caption_dropout {prob:g})" if trained else
                "not trained (caption_dropout 0): guidance needs --cfg-scale 1 or --allow-untrained-uncond"}
    if not cfg.data.num_classes:
        return {"trained": None, "class_dropout_prob": None, "text": "none (no class labels: nothing to guide against)"}
    try:
        kwargs = model_kwargs(cfg)
    except ConfigError as err:  # info still describes a checkpoint whose config no longer builds
        return {"trained": None, "class_dropout_prob": None, "text": f"unknown ({err})"}
    if "class_dropout_prob" in kwargs:
        prob = kwargs["class_dropout_prob"]
    else:
        parameter = inspect.signature(MODEL_FAMILIES.get(family).obj).parameters.get("class_dropout_prob")
        if parameter is None or parameter.default is inspect.Parameter.empty:
            return {"trained": None, "class_dropout_prob": None, "text": "unknown (this model family takes no label dropout)"}
        prob = parameter.default
    prob = float(prob)
    if prob > 0:
        return {"trained": True, "class_dropout_prob": prob, "text": f"trained (class_dropout_prob {prob:g})"}
    return {
        "trained": False, "class_dropout_prob": prob,
        "text": "not trained (class_dropout_prob 0): guidance needs --cfg-scale 1 or --allow-untrained-uncond",
    }


@COMMANDS.register("info", order=30, summary="describe a run or checkpoint: config, parameters, step, data")
def register(subparsers: Any) -> None:
    inf = subparsers.add_parser("info", help="describe a run or checkpoint: config, parameters, step, data",
                                description="Print a checkpoint's config and facts.")
    inf.add_argument("path", metavar="RUN_OR_CKPT", help="a run directory (its newest checkpoint) or a checkpoint")
    inf.add_argument("--json", action="store_true", help="one JSON object instead of text")
    inf.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from ditkit.checkpoint_io import Checkpoint, list_checkpoints
    from ditkit.config import ConfigError

    try:
        ckpt = Checkpoint.open(args.path)
    except ConfigError as err:  # the checkpoint reader names --ckpt; info takes a positional path
        raise ConfigError(str(err).replace("--ckpt ", "")) from None
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
        "unconditional_branch": unconditional_branch(cfg),
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
    o = cfg.objective
    if o.kind == "distill":  # progressive distillation: what the student learned from
        print(f"objective    distill ({o.prediction}, {o.schedule}): a student of {o.teacher} "
              f"({o.teacher_steps} DDIM steps -> {(o.teacher_steps or 0) // 2}), guidance {o.teacher_cfg_scale:g} "
              "baked in: sample at cfg 1")
    else:
        print(f"objective    {o.kind}" + (f" ({o.prediction}, {o.schedule}, learn_sigma={o.learn_sigma})"
                                           if o.kind == "gaussian" else f" ({o.time_sampling})"))
    print(f"unconditional branch: {facts['unconditional_branch']['text']}")
    print(f"checkpoints  {', '.join(facts['checkpoints']) or '-'}")
    print("config:")
    print(cfg.to_json(), end="")
    return 0

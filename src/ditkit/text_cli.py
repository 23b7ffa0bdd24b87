"""The text side of ``ditkit sample`` and ``ditkit eval``: extra flags and the commands for text
checkpoints. ``ditkit.cli`` adds the flags and hands a text checkpoint to these functions.

    ditkit train --recipe text_sums                                  # masked diffusion, seconds
    ditkit train --recipe text_sums --set objective.kind=autoregressive --run-name ar
    ditkit sample --ckpt results/000-TextDiT-T-synthetic-sums --prompt "3+4=" --num-tokens 12
    ditkit sample --ckpt RUN --infill "12+__=19"                     # fill each _ (masked models)
    ditkit sample --ckpt RUN --num-tokens 200                        # beyond seq_len: semi-autoregressive
    ditkit eval --ckpt RUN                                           # bits per char, validity, tokens/s
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ditkit.config import ConfigError

__all__ = [
    "is_text_checkpoint", "add_text_sample_arguments", "add_text_eval_arguments", "refuse_text_flags",
    "cmd_sample_text", "cmd_eval_text",
]


def is_text_checkpoint(path: Any) -> bool:
    """True when ``path`` resolves to a checkpoint of a text model (False for anything else: the
    image command then reports its own errors)."""
    if path is None:
        return False
    from ditkit.checkpoint_io import load_checkpoint_config, resolve_checkpoint

    try:
        return load_checkpoint_config(resolve_checkpoint(path)).modality == "text"
    except ConfigError:
        return False


def add_text_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ditkit sample`` that only text models take."""
    g = parser.add_argument_group("text models")
    g.add_argument("--prompt", help="text every sample starts with (placed at the start of a document)")
    g.add_argument("--suffix", help="masked models: text every sample ends with")
    g.add_argument("--infill", metavar="TEMPLATE", help="masked models: fill each --mask-char of TEMPLATE, e.g. '12+__=19'")
    g.add_argument("--mask-char", default="_", help="the character marking positions to fill in --infill (default _)")
    g.add_argument("--num-tokens", type=int, help="tokens per sample (default: the training seq_len; longer: semi-autoregressive)")
    g.add_argument("--stride", type=int, help="semi-autoregressive: new tokens per window (default: half the window)")
    g.add_argument("--temperature", type=float, help="default: the checkpoint's sample.temperature; 0 is greedy")
    g.add_argument("--top-k", type=int, help="autoregressive models: sample among the k most likely tokens")
    g.add_argument("--remasking", choices=["random", "low_confidence"], help="masked models: which positions to reveal")
    g.add_argument("--no-document-start", action="store_true", help="no separator before --prompt / --infill")


def add_text_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ditkit eval`` for text models; a text checkpoint is routed to ``cmd_eval_text``."""
    g = parser.add_argument_group("text models")
    g.add_argument("--num-passes", type=int, default=4, help="NELBO passes over the validation chunks (standard error)")
    g.add_argument("--max-val-sequences", type=int, help="score only the first N validation chunks")
    g.add_argument("--temperature", type=float, help="text samplers (default: the checkpoint's)")
    image_command = parser.get_default("func")  # the image handler set by ditkit.eval.cli_eval (or None)

    def dispatch(args: argparse.Namespace) -> int:
        if getattr(args, "npz", None) is None and is_text_checkpoint(args.ckpt):
            return cmd_eval_text(args)
        if image_command is None:
            raise ConfigError("ditkit eval scores text checkpoints here; image evaluation is not installed")
        return image_command(args)

    parser.set_defaults(func=dispatch)


def _refuse_image_flags(args: argparse.Namespace, names: dict[str, str]) -> None:
    for attr, flag in names.items():
        value = getattr(args, attr, None)
        if value not in (None, False):
            raise ConfigError(f"{flag} is for image models: drop it for a text checkpoint")


def refuse_text_flags(args: argparse.Namespace) -> None:
    """Raise if a text-only ``ditkit sample`` flag was given for an image checkpoint."""
    for attr in ("prompt", "suffix", "infill", "num_tokens", "stride", "temperature", "top_k", "remasking"):
        if getattr(args, attr, None) is not None:
            raise ConfigError(f"--{attr.replace('_', '-')} is for text models: this checkpoint is an image model")
    if getattr(args, "no_document_start", False) or getattr(args, "mask_char", "_") != "_":
        raise ConfigError("--no-document-start / --mask-char are for text models: this checkpoint is an image model")


def cmd_sample_text(args: argparse.Namespace) -> int:
    """``ditkit sample`` on a text checkpoint: prints the samples and writes samples.txt / samples.jsonl."""
    from ditkit.checkpoint_io import load_checkpoint_config, resolve_checkpoint
    from ditkit.text_sampling import default_text_sampler, format_samples, generate_text

    _refuse_image_flags(args, {
        "guide_channels": "--guide-channels", "ddim_eta": "--ddim-eta", "npz": "--npz", "trajectory": "--trajectory",
        "timestep_spacing": "--timestep-spacing", "vae": "--vae", "nrow": "--nrow",
    })
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    cfg = load_checkpoint_config(resolve_checkpoint(args.ckpt))
    own = default_text_sampler(cfg)
    if args.sampler not in (None, "auto", own):
        raise ConfigError(f"--sampler {args.sampler} does not fit this {cfg.objective.kind} text model: use {own}")
    result = generate_text(
        args.ckpt, class_labels=args.class_labels, num_samples=args.num_samples, seed=args.seed,
        use_ema=not args.no_ema, device=args.device, precision=args.precision, batch_size=args.batch_size,
        prompt=args.prompt, suffix=args.suffix, infill=args.infill, mask_char=args.mask_char,
        num_tokens=args.num_tokens, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
        temperature=args.temperature, top_k=args.top_k, remasking=args.remasking, stride=args.stride,
        at_document_start=not args.no_document_start,
    )
    meta = result.metadata
    if args.out_dir:
        out = Path(args.out_dir)
    else:
        ckpt_dir = Path(meta["checkpoint"])
        name = f"{ckpt_dir.name}-{meta['sampler']}-{meta['num_sampling_steps']}-cfg{meta['cfg_scale']}-seed{meta['seed']}"
        out = ckpt_dir.parent.parent / "samples" / name
    out.mkdir(parents=True, exist_ok=True)
    records = result.records()

    def header(i: int) -> str:
        label = f", label {records[i]['label']}" if "label" in records[i] else ""
        return f"==== sample {i} (seed {records[i]['seed']}{label}) ===="

    info = "".join(f"# {k}: {v}\n" for k, v in meta.items())
    (out / "samples.txt").write_text(info + format_samples(result.texts, header), encoding="utf-8")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"metadata": meta}, ensure_ascii=False) + "\n")
        for row in records:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(format_samples(result.texts, header), end="")
    print(f"{len(records)} samples ({meta['sampler']}, {meta['num_sampling_steps']} steps, cfg {meta['cfg_scale']}) "
          f"from {meta['checkpoint']}")
    print(f"wrote {out / 'samples.txt'}")
    print(f"wrote {out / 'samples.jsonl'}")
    return 0


def cmd_eval_text(args: argparse.Namespace) -> int:
    """``ditkit eval`` on a text checkpoint: prints the results as JSON and writes them to a file."""
    from ditkit.text_eval import evaluate_text

    _refuse_image_flags(args, {
        "data": "--data", "image_size": "--image-size", "inception_weights": "--inception-weights", "vae": "--vae",
        "guide_channels": "--guide-channels", "timestep_spacing": "--timestep-spacing",
    })
    if getattr(args, "sampler", None) not in (None, "auto"):
        raise ConfigError(f"--sampler {args.sampler} is an image sampler: text models use their own (drop --sampler)")
    results = evaluate_text(
        args.ckpt, num_samples=args.num_samples, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
        temperature=args.temperature, seed=args.seed, num_passes=args.num_passes,
        max_val_sequences=args.max_val_sequences, batch_size=args.batch_size, use_ema=not args.no_ema,
        device=args.device, precision=args.precision,
    )
    if args.out:
        out = Path(args.out)
    else:
        ckpt_dir = Path(results["checkpoint"])
        s = results["samples"]
        out = ckpt_dir.parent.parent / "eval" / f"{ckpt_dir.name}-text-{s['sampler']}-{s['num_sampling_steps']}-n{s['num_samples']}-seed{s['seed']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {out}")
    return 0

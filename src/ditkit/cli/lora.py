"""``ditkit lora merge|export|info``: LoRA adapters (``ditkit.adapters``) outside training.

    ditkit lora merge BASE ADAPTER[:WEIGHT] ... --out RUN   fold adapters into the base: a standard run
    ditkit lora merge LORA_RUN --out RUN                    a LoRA run into its own base
    ditkit lora export RUN OUT [--peft-only]                a LoRA run's adapter in the diffusers / peft layout
    ditkit lora info PATH                                   an adapter's rank, targets, size and base

Training adapters is ``ditkit train --init-from BASE --lora-rank R``; sampling with them is
``ditkit sample --ckpt BASE --lora RUN[:WEIGHT]`` (docs/lora.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ditkit.config import ConfigError
from ditkit.fileio import atomic_path, write_text
from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_lora", "merge_to_run"]


@COMMANDS.register("lora", order=65, summary="merge LoRA adapters into a base, export them for diffusers/peft")
def register(subparsers: Any) -> None:
    lo = subparsers.add_parser("lora", help="merge LoRA adapters into a base, export them for diffusers/peft",
                               description="LoRA adapters outside training (train them with ditkit train --lora-rank).")
    sub = lo.add_subparsers(dest="lora_command", required=True)
    me = sub.add_parser("merge", help="fold adapters into the base weights and write a standard run")
    me.add_argument("base", metavar="BASE", help="the base run or checkpoint the adapters were trained on")
    me.add_argument("adapters", nargs="*", metavar="ADAPTER[:WEIGHT]",
                    help="LoRA run, checkpoint, adapter folder or file; WEIGHT scales it (default 1). "
                         "None: BASE is a LoRA run, merged into its own base")
    me.add_argument("--out", required=True, metavar="RUN", help="the run directory to write (must not hold checkpoints)")
    me.add_argument("--no-ema", action="store_true", help="merge the base's raw weights instead of its EMA")
    ex = sub.add_parser("export", help="write a LoRA run's adapter as diffusers' pytorch_lora_weights.safetensors "
                                       "and peft's adapter_model.safetensors")
    ex.add_argument("run", metavar="RUN", help="a LoRA run (ditkit train --lora-rank) or its checkpoint")
    ex.add_argument("out", metavar="OUT", help="folder to write into")
    ex.add_argument("--no-ema", action="store_true", help="export the raw adapter instead of its EMA")
    ex.add_argument("--peft-only", action="store_true",
                    help="write peft's layout only (an adapter trained with --lora-train-modules has no diffusers form)")
    inf = sub.add_parser("info", help="describe an adapter: rank, alpha, targets, size, base")
    inf.add_argument("path", metavar="PATH", help="LoRA run, checkpoint, adapter folder or file")
    lo.set_defaults(func=cmd_lora)


def cmd_lora(args: argparse.Namespace) -> int:
    if args.lora_command == "merge":
        out = merge_to_run(args.base, args.adapters, args.out, use_ema=not args.no_ema)
        print(f"wrote merged run {out}")
        return 0
    if args.lora_command == "export":
        for path in _export(args.run, args.out, use_ema=not args.no_ema, peft_only=args.peft_only):
            print(f"wrote {path}")
        return 0
    return _info(args.path)


def merge_to_run(base: str | Path, adapters: list[str], out: str | Path, *, use_ema: bool = True) -> Path:
    """Load ``base`` (a standard run, or a LoRA run: its base plus its own adapter), stack
    ``adapters`` (``"PATH[:WEIGHT]"``), fold them all into the weights (``merge_adapters``) and write
    ``out`` as a standard run: ``config.json``, ``checkpoints/step_N/{model.safetensors, config.json}``
    (weights only: it samples, evaluates and fine-tunes like any run; it does not resume) and
    ``merged_from.json`` (base, adapters, weights, file hashes). Returns the checkpoint written."""
    from safetensors.torch import save_file

    from ditkit.adapters import merge_adapters
    from ditkit.checkpoint_io import CONFIG_FILE, MODEL_FILE, latest_checkpoint, step_dir_name
    from ditkit.data.tokenizers import save_tokenizer
    from ditkit.pipelines import load

    out = Path(out)
    if latest_checkpoint(out) is not None:
        raise ConfigError(f"--out {out} already holds checkpoints: pick a new run directory")
    pipe = load(base, device="cpu", use_ema=use_ema, lora=adapters)
    if not pipe.loras:
        raise ConfigError(f"nothing to merge: {base} has no adapter and none was given")
    record = {"base": str(pipe.checkpoint.dir), "base_weights": pipe.weights, "adapters": json.loads(pipe.provenance()["lora"])}
    cfg = pipe.cfg
    adapter_run = _lora_run_config(adapters[-1]) if adapters else None  # the adapter's data (class names)
    if adapter_run is not None and adapter_run.model == cfg.model:
        cfg = adapter_run
    cfg = type(cfg).from_dict(cfg.to_dict())
    cfg.train.lora_rank = 0  # a standard run now; train.init_from stays as the record of its origin
    cfg.train.lora_train_modules = ""  # folded in too (the copies replace the base's modules)
    merge_adapters(pipe.model)
    ckpt = out / "checkpoints" / step_dir_name(pipe.step or 0)
    ckpt.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in pipe.model.state_dict().items()}
    with atomic_path(ckpt / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "step": str(pipe.step or 0)})
    # the tokenizer beside config.json (text runs, prompt runs' own encoder: a fitted vocabulary has no other copy)
    tokenizer = getattr(pipe, "tokenizer", None) if getattr(pipe, "encoder", None) is None else None
    for where in (ckpt, out):
        write_text(where / CONFIG_FILE, cfg.to_json())
        if tokenizer is not None and hasattr(tokenizer, "to_dict"):
            save_tokenizer(tokenizer, where)
    write_text(out / "merged_from.json", json.dumps(record, indent=2) + "\n")
    return ckpt


def _lora_run_config(spec: str) -> Any:
    """The config of the LoRA run an ``--adapter`` spec names, or None for a bare adapter."""
    from ditkit.adapters import parse_adapter_spec
    from ditkit.checkpoint_io import Checkpoint

    path, _ = parse_adapter_spec(spec)
    try:
        return Checkpoint.open(path).config
    except ConfigError:
        return None


def _export(run: str | Path, out: str | Path, *, use_ema: bool, peft_only: bool = False) -> list[Path]:
    """Write the run's adapter as diffusers' LoRA file and peft's files (``peft_only``: peft's only).
    An adapter that trains whole modules (``--lora-train-modules``) has no diffusers form: without
    ``peft_only`` that is a ConfigError before anything is written."""
    from ditkit.adapters import adapters_of, export_lora_diffusers, save_adapter
    from ditkit.checkpoint_io import Checkpoint, is_adapter_checkpoint
    from ditkit.pipelines import load

    checkpoint = Checkpoint.open(run)
    if not is_adapter_checkpoint(checkpoint.dir):
        raise ConfigError(f"{run} is not a LoRA run (no adapter/ in {checkpoint.dir}): train one with --lora-rank")
    pipe = load(checkpoint, device="cpu", use_ema=use_ema)
    (name,) = pipe.loras
    info = adapters_of(pipe.model)[name]
    if info.modules_to_save and not peft_only:
        raise ConfigError(
            f"{run} also trains {', '.join(info.modules_to_save)} whole (--lora-train-modules "
            f"{','.join(info.train_modules)}), which diffusers' LoRA layout cannot hold: add --peft-only for peft's "
            "layout, or merge it (ditkit lora merge) and export the full model"
        )
    files = [] if peft_only else [export_lora_diffusers(pipe.model, out, name)]
    save_adapter(pipe.model, out, name)  # peft's layout: adapter_model.safetensors + adapter_config.json
    return files + [Path(out) / "adapter_model.safetensors", Path(out) / "adapter_config.json"]


def _info(path: str) -> int:
    from ditkit.adapters import find_adapter

    file = find_adapter(path)
    config = file.parent / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"{file}: no adapter_config.json beside it (a diffusers LoRA file: load it with --lora)")
    data = json.loads(config.read_text())
    own = data.get("ditkit", {})
    print(f"adapter      {file} ({file.stat().st_size / 1024:.1f} KiB)")
    print(f"rank         {data['r']} (alpha {data['lora_alpha']:g}, {own.get('variant', 'lora')})")
    print(f"targets      {', '.join(own.get('targets', []))}: {len(data['target_modules'])} layers")
    whole = data.get("modules_to_save") or []
    if whole:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:  # the copies' sizes, from the header only
            sizes = {m: sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(m + ".")) for m in whole}
        listed = ", ".join(f"{m} ({n:,} weights)" for m, n in sizes.items())
        print(f"whole modules {listed} ({', '.join(own.get('train_modules', []))}; replaces the module at any weight != 0)")
    print(f"base         {own.get('base_model', '?')} (weights sha256 {str(own.get('base_sha256'))[:12]})")
    return 0


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count

"""The ``ditkit`` command: ``train``, ``sample``, ``info``, ``eval``, ``import-dit``, ``export-diffusers``
(also ``python -m ditkit``).

Examples::

    ditkit train --recipe digits                       # the main job, ~10 min on 2 CPU cores
    ditkit train --data path/to/folder --model DiT-S/4 --image-size 32 --max-steps 20000
    ditkit train --resume results/000-DiT-XS-4-digits  # continue exactly where it stopped
    ditkit sample --ckpt results/000-DiT-XS-4-digits --class-labels 1 2 3 --num-samples 12
    ditkit info results/000-DiT-XS-4-digits
    ditkit eval --ckpt results/000-DiT-XS-4-digits --num-samples 1000   # FD, precision/recall, accuracy
    ditkit import-dit DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --out runs/dit-xl-256
    ditkit export-diffusers runs/dit-xl-256 out/dit-xl-256 --vae path/to/sd-vae-ft-ema
    ditkit train --recipe dit_xl_2_imagenet256 --data my/folders --vae path/to/sd-vae --image-size 256
                 --init-from runs/dit-xl-256 --class-map 0:207,1:360   # fine-tune from ImageNet classes
    ditkit train --recipe text_sums                    # text: masked diffusion on a+b=c, seconds
    ditkit sample --ckpt results/000-TextDiT-T-synthetic-sums --prompt "3+4=" --num-tokens 12
    ditkit eval --ckpt results/000-TextDiT-T-synthetic-sums   # bits per char, validity, tokens/s

Flags shared with the official DiT scripts keep their names (``--model --image-size
--num-classes --global-batch-size --global-seed --epochs --log-every --ckpt-every --results-dir``;
``--ckpt --cfg-scale --num-sampling-steps --seed``); ``--set section.key=value`` reaches any
config value. Bad input stops before any work with a message that says what to change.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ditkit.config import DIT_FLAGS, Config, ConfigError, apply_overrides, load_config, parse_set_option

__all__ = ["main", "build_parser"]

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as ``ditkit <cmd>: error: ...`` with a "did you mean" hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "unrecognized arguments" in message:
            unknown = message.split(":", 1)[1].split()
            flags = [s for a in self._actions for s in a.option_strings]
            hints = []
            for word in unknown:
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                    hints.append(f"{word} (did you mean {close[0]}?)" if close else word)
            if hints:
                message = f"unknown flag(s): {', '.join(hints)}. See `{self.prog} --help`"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditkit", description="Diffusion Transformers: train, sample, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.set_defaults(_subparsers=sub.choices)  # lets main() report unknown flags per command

    # ---- train
    tr = sub.add_parser("train", help="train a DiT (or resume a run)", description="Train a DiT on images.")
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
    tr.add_argument("--model", default=S, help="DiT preset, e.g. DiT-S/2, DiT-XS/4, DiT-T/4")
    tr.add_argument("--image-size", type=int, default=S)
    tr.add_argument("--num-classes", type=int, default=S, help="0 trains unconditionally")
    tr.add_argument("--global-batch-size", type=int, default=S)
    tr.add_argument("--global-seed", type=int, default=S)
    tr.add_argument("--epochs", type=int, default=S)
    tr.add_argument("--max-steps", type=int, default=S)
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

    # ---- sample
    sa = sub.add_parser("sample", help="generate images from a checkpoint", description="Sample images from a checkpoint.")
    sa.add_argument("--ckpt", required=True, metavar="RUN_OR_CKPT", help="run directory (newest checkpoint) or checkpoint")
    sa.add_argument("--class-labels", type=int, nargs="+", metavar="LABEL", help="labels to draw (repeated to --num-samples)")
    sa.add_argument("--num-samples", type=int, help="number of images (default: the labels given, or 16)")
    sa.add_argument("--sampler", choices=["auto", "ddpm", "ddim", "dpm++", "euler", "heun", "ancestral", "autoregressive"],
                    help="default: the checkpoint's (text: ancestral for masked, autoregressive for AR models)")
    sa.add_argument("--num-sampling-steps", type=int)
    sa.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = none)")
    sa.add_argument("--guide-channels", type=int, help="guide only the first N output channels")
    sa.add_argument("--ddim-eta", type=float)
    sa.add_argument("--timestep-spacing", choices=["uniform", "quadratic"], help="gaussian samplers (default: the checkpoint's)")
    sa.add_argument("--vae", metavar="DIR", help="latent models: AutoencoderKL folder to decode with (default: the recorded one)")
    sa.add_argument("--seed", type=int, help="sample i uses seed + i (default: the checkpoint's sample.seed)")
    sa.add_argument("--batch-size", type=int, default=64)
    sa.add_argument("--out-dir", help="default: RUN/samples/<step>-<sampler>-<steps>-cfg<scale>-seed<seed>")
    sa.add_argument("--npz", action="store_true", help="also write samples.npz (ADM evaluator: arr_0 uint8 NxHxWxC)")
    sa.add_argument("--trajectory", action="store_true", help="also write trajectory.png: x0 predictions along the way")
    sa.add_argument("--trajectory-points", type=int, default=8)
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--nrow", type=int, help="images per grid row")
    sa.add_argument("--device", default="auto")
    sa.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    from ditkit.text_cli import add_text_eval_arguments, add_text_sample_arguments  # text checkpoints

    add_text_sample_arguments(sa)

    # ---- info
    inf = sub.add_parser("info", help="describe a run or checkpoint", description="Print a checkpoint's config and facts.")
    inf.add_argument("path", metavar="RUN_OR_CKPT")
    inf.add_argument("--json", action="store_true", help="one JSON object instead of text")

    # ---- eval, import-dit, export-diffusers: their rooms own the flags; each sets args.func
    from ditkit.eval.cli_eval import register_cli as register_eval
    from ditkit.interop.cli import register_cli as register_interop

    register_eval(sub)
    add_text_eval_arguments(sub.choices["eval"])  # routes text checkpoints to ditkit.text_cli
    register_interop(sub)
    from ditkit.serve.cli import register_cli as register_serve  # `serve`; FastAPI only when it runs

    register_serve(sub)
    return parser


# ---- train ---------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace) -> tuple[Config, Optional[Path]]:
    """The config a train command asks for, and the checkpoint to resume (or None)."""
    from ditkit.recipes import get_recipe
    from ditkit.train.checkpoint import load_checkpoint_config, resolve_checkpoint

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
        ckpt = resolve_checkpoint(args.resume)
        cfg = load_checkpoint_config(ckpt)
        from ditkit.train.loop import RESUMABLE_SECTIONS

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


def _cmd_train(args: argparse.Namespace) -> int:
    if args.list_recipes:
        from ditkit.recipes import RECIPES

        for name, fn in RECIPES.items():
            print(f"{name:24s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    from ditkit.train.loop import preflight, train

    cfg, ckpt = _train_config(args)
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
    print(f"steps: {result.step}  loss: {result.loss if result.loss is None else round(result.loss, 5)}  "
          f"wall time: {result.wall_time_s:.1f} s")
    return EXIT_INTERRUPTED if result.interrupted else 0


# ---- sample --------------------------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    from ditkit.sampling import display_scale, generate, make_grid, save_png, to_uint8
    from ditkit.text_cli import cmd_sample_text, is_text_checkpoint, refuse_text_flags

    if is_text_checkpoint(args.ckpt):  # decoded text instead of PNGs
        return cmd_sample_text(args)
    refuse_text_flags(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    from ditkit.train.distributed import setup_sampling

    procs = setup_sampling(args.device)  # under torchrun: the ranks share the seeds, rank 0 writes
    try:
        result = generate(
            args.ckpt, class_labels=args.class_labels, num_samples=args.num_samples, sampler=args.sampler,
            num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels,
            ddim_eta=args.ddim_eta, seed=args.seed, batch_size=args.batch_size, use_ema=not args.no_ema,
            trajectory_points=args.trajectory_points if args.trajectory else 0,
            device=str(procs.device) if procs.active else args.device,
            precision=args.precision, timestep_spacing=args.timestep_spacing, vae=args.vae, distributed=procs.active,
        )
    finally:
        procs.close()
    if not procs.is_main:
        return 0
    meta = result.metadata
    if args.out_dir:
        out = Path(args.out_dir)
    else:
        ckpt_dir = Path(meta["checkpoint"])
        name = f"{ckpt_dir.name}-{meta['sampler']}-{meta['num_sampling_steps']}-cfg{meta['cfg_scale']}-seed{meta['seed']}"
        out = ckpt_dir.parent.parent / "samples" / name
    out.mkdir(parents=True, exist_ok=True)
    if result.is_latent:  # a latent model without a VAE: no pixels to write, only the latents
        arrays = {"arr_0": result.images.numpy(), "seeds": np.asarray(result.seeds, dtype=np.int64)}
        if result.labels is not None:
            arrays["arr_1"] = np.asarray(result.labels, dtype=np.int64)
        np.savez(out / "latents.npz", **arrays)
        print(f"{len(result.images)} latents {tuple(result.images.shape[1:])} ({meta['sampler']}, {meta['num_sampling_steps']} "
              f"steps, cfg {meta['cfg_scale']}) from {meta['checkpoint']}")
        print(f"wrote {out / 'latents.npz'} (arr_0: float32 latents in DiT space). No VAE: no PNGs; "
              "pass --vae PATH (a local AutoencoderKL folder) to decode images")
        return 0
    size = result.images.shape[-1]
    scale = display_scale(size)
    pixels = to_uint8(result.images)  # (N, H, W, C)
    for i in range(len(pixels)):
        save_png(pixels[i], out / f"{i:06d}.png", result.sample_metadata(i))
    nrow = args.nrow
    if nrow is None and result.labels is not None and args.class_labels and len(result.labels) % len(args.class_labels) == 0:
        nrow = len(args.class_labels) if len(args.class_labels) > 1 else None
    save_png(make_grid(result.images, nrow=nrow, scale=scale), out / "grid.png", meta)
    written = [out / "grid.png", out / f"{0:06d}.png ... {len(pixels) - 1:06d}.png"]
    if args.npz:
        arrays = {"arr_0": pixels}
        if result.labels is not None:
            arrays["arr_1"] = np.asarray(result.labels, dtype=np.int64)
        np.savez(out / "samples.npz", **arrays)
        written.append(out / "samples.npz")
    if result.trajectory is not None:
        traj = result.trajectory[: min(8, len(result.trajectory))]  # (n, K, C, H, W): rows = samples
        n, k = traj.shape[:2]
        strip = make_grid(traj.reshape(n * k, *traj.shape[2:]), nrow=k, scale=scale)
        steps = " ".join(map(str, result.trajectory_steps))
        save_png(strip, out / "trajectory.png", {**meta, "trajectory_steps": steps, "layout": "rows: samples, columns: steps"})
        written.append(out / "trajectory.png")
    print(f"{len(pixels)} samples ({meta['sampler']}, {meta['num_sampling_steps']} steps, cfg {meta['cfg_scale']}) from {meta['checkpoint']}")
    for path in written:
        print(f"wrote {path}")
    return 0


# ---- info ----------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from ditkit.train.checkpoint import checkpoint_facts, list_checkpoints, load_checkpoint_config, resolve_checkpoint

    ckpt = resolve_checkpoint(args.path)
    cfg = load_checkpoint_config(ckpt)
    header = checkpoint_facts(ckpt)
    step, epoch, num_params = header["step"], header["epoch"], header["num_params"]
    run_dir = ckpt.parent.parent
    facts = {
        "checkpoint": str(ckpt),
        "step": step,
        "epoch": epoch,
        "model": cfg.model.name,
        "parameters": num_params,
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "num_classes": cfg.data.num_classes,
        "objective": cfg.objective.kind,
        "checkpoints": [p.name for p in list_checkpoints(run_dir)],
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
    print(f"data         {cfg.data.dataset}: {shape}, {cfg.data.num_classes or 'no'} classes")
    print(f"objective    {cfg.objective.kind}" + (f" ({cfg.objective.prediction}, {cfg.objective.schedule}, "
          f"learn_sigma={cfg.objective.learn_sigma})" if cfg.objective.kind == "gaussian" else f" ({cfg.objective.time_sampling})"))
    print(f"checkpoints  {', '.join(facts['checkpoints']) or '-'}")
    print("config:")
    print(cfg.to_json(), end="")
    return 0


# ---- entry point -----------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ditkit`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the subcommand's parser, which knows its flags for the hint
            args._subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return int(exit_.code or 0)
    from ditkit.train.loop import NonFiniteLossError

    commands = {"train": _cmd_train, "sample": _cmd_sample, "info": _cmd_info}
    try:
        return commands[args.command](args) if args.command in commands else args.func(args)
    except ConfigError as err:
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"ditkit {args.command}: aborted (the newest complete checkpoint is kept)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""``ditkit import-dit`` and ``ditkit export-diffusers``: the command-line front ends of the interop room:

    ditkit import-dit DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --out runs/dit-xl-256 [--vae sd-vae]
    ditkit export-diffusers RUN_OR_CKPT OUT [--vae path/to/sd-vae] [--allow-lossy]

``import-dit`` writes a standard ditkit run (``config.json`` with a full Config, and
``checkpoints/step_0000000/`` with ``model.safetensors`` and ``ema.safetensors``), so ``ditkit
sample --ckpt RUN``, ``ditkit info RUN``, ``ditkit eval`` and ``ditkit train --init-from RUN`` read it
like any run. The config records the official sampling algorithm (linear schedule, learned sigma,
eps prediction, 250 uniform DDPM steps, no x0 clipping, guidance on 3 latent channels).

``export-diffusers`` refuses a model diffusers would not reproduce exactly (trained with
``timestep_freq_shift`` 0, ditkit's default) unless ``--allow-lossy``, which warns with the cost
measured on trained models (docs/interop.md); it prints how to load the folder and how guidance
works there (the null class, ``pipeline_ditkit.py`` for other than 1000 classes).

Errors are InteropError / ConfigError with the fix in the message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_import_dit", "cmd_export_diffusers"]


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@COMMANDS.register("import-dit", order=60, summary="import an official DiT checkpoint; export a run to diffusers")
def register(subparsers: Any) -> None:
    """Add ``import-dit`` and ``export-diffusers``."""
    imp = subparsers.add_parser(
        "import-dit", help="import an official facebookresearch/DiT checkpoint as a ditkit run",
        description="Read an official DiT .pt (released weights or a training checkpoint, EMA used) "
        "and write a standard ditkit run directory. Omitted flags are read off the checkpoint.",
    )
    imp.add_argument("checkpoint", metavar="FILE.pt")
    imp.add_argument("--model", default=None, help="preset, e.g. DiT-XL/2 (default: inferred)")
    imp.add_argument("--image-size", type=int, default=None, help="pixels; latent = image-size / 8 (default: inferred)")
    imp.add_argument("--num-classes", type=int, default=None, help="default: inferred")
    imp.add_argument("--learn-sigma", type=_bool, default=None, metavar="true|false", help="default: inferred")
    imp.add_argument("--use-model-weights", action="store_true", help="training checkpoints: 'model' instead of 'ema'")
    imp.add_argument("--vae", default=None, metavar="DIR", help="local AutoencoderKL folder to record for decoding")
    imp.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale recorded for sampling (official default 4.0)")
    imp.add_argument("--out", required=True, metavar="RUN")
    imp.set_defaults(func=cmd_import_dit)

    exp = subparsers.add_parser(
        "export-diffusers", help="write a checkpoint as a diffusers DiT (or DiTPipeline with --vae)",
        description="Write a DiTTransformer2DModel folder; with a VAE (--vae, or the one a latent run "
        "records) a full DiTPipeline folder.",
    )
    exp.add_argument("ckpt", metavar="RUN_OR_CKPT")
    exp.add_argument("out", metavar="OUT")
    exp.add_argument("--vae", default=None, metavar="DIR", help="local AutoencoderKL folder: write a DiTPipeline")
    exp.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    exp.add_argument("--allow-lossy", action="store_true",
                     help="export even when diffusers will not reproduce the model exactly (timestep_freq_shift 0: warns "
                          "with the measured cost)")
    exp.set_defaults(func=cmd_export_diffusers)


def cmd_import_dit(args: argparse.Namespace) -> int:
    from ditkit.interop.common import InteropError, imported_config, save_imported_run
    from ditkit.interop.official import VAE_DOWNSAMPLE, import_official_dit, read_official_checkpoint

    if args.vae is not None:
        from ditkit.interop.vae import vae_folder

        vae_folder(args.vae)  # fails early when it is not an AutoencoderKL folder
    ckpt = read_official_checkpoint(args.checkpoint, use_ema=not args.use_model_weights)
    model = import_official_dit(
        ckpt, model=args.model, image_size=args.image_size, num_classes=args.num_classes, learn_sigma=args.learn_sigma
    )
    image_size = model.input_size * VAE_DOWNSAMPLE
    meta = ckpt.meta() | {"image_size": image_size}
    dataset = str((ckpt.args or {}).get("data_path") or "imagenet")
    cfg = imported_config(model, image_size, vae_downsample=VAE_DOWNSAMPLE, dataset=dataset, vae=args.vae, cfg_scale=args.cfg_scale)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise InteropError(f"--out {args.out} exists and is not empty: pick a new run directory")
    step_dir = save_imported_run(model, args.out, cfg, meta)
    print(json.dumps({"out": str(args.out), "checkpoint": str(step_dir), **meta}, indent=2))
    decode = f"decodes through {args.vae}" if args.vae else "has no VAE recorded: pass --vae PATH to ditkit sample to decode (without it, latents are written)"
    print(f"sample with: ditkit sample --ckpt {args.out}  (DDPM 250 steps, cfg {args.cfg_scale:g} on 3 channels, no clipping; {decode})")
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    from ditkit.builders import load_model
    from ditkit.checkpoint_io import Checkpoint
    from ditkit.interop.common import InteropError
    from ditkit.interop.diffusers_format import export_diffusers

    ckpt = Checkpoint.open(args.ckpt)
    model, _ = load_model(ckpt, use_ema=not args.no_ema)
    cfg, ckpt_dir = ckpt.config, ckpt.dir
    objective = cfg.objective
    vae = args.vae if args.vae is not None else cfg.data.vae
    if vae is not None and not cfg.data.latent_channels:
        raise InteropError(f"--vae {vae}: {ckpt_dir} is a pixel-space model; a DiTPipeline needs a latent model. Drop --vae")
    if vae is not None and objective.kind != "gaussian":
        raise InteropError(
            f"{ckpt_dir} was trained with objective {objective.kind!r}; DiTPipeline runs Gaussian (DDPM) "
            "models only. Export without --vae to get the transformer folder alone"
        )
    import sys
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # said once on stderr, without a source line
        warnings.simplefilter("always")
        out = export_diffusers(
            model, args.out, vae=vae, schedule=objective.schedule, num_timesteps=objective.num_timesteps,
            prediction=objective.prediction, id2label=cfg.data.class_names or None, allow_lossy=args.allow_lossy,
        )
    for warning in caught:
        print(f"ditkit export-diffusers: warning: {warning.message}", file=sys.stderr)
    from ditkit.pipelines.base import unconditional_branch_trained

    print(export_message(out, ckpt_dir, model.num_classes, pipeline=vae is not None, learn_sigma=model.learn_sigma,
                         null_trained=unconditional_branch_trained(model)))
    return 0


def export_message(out: Path, source: Path, num_classes: int, *, pipeline: bool, learn_sigma: bool,
                   null_trained: bool = True) -> str:
    """What was written and exactly how to use it in diffusers, guidance included."""
    null = num_classes  # ditkit's (and diffusers' LabelEmbedding's) null row: the last one
    lines = [f"wrote {'DiTPipeline' if pipeline else 'DiTTransformer2DModel'} folder {out} from {source}"]
    if not pipeline:
        lines += [
            f"  load: DiTTransformer2DModel.from_pretrained({str(out)!r}); call transformer(x, timestep=t, class_labels=y).sample",
            f"  guidance: pass label {null} as the null class (cond and uncond in one batch); there is no DiTPipeline for a "
            "pixel-space model (it needs a VAE): drive the transformer with your own sampler or sample with ditkit",
        ]
    elif num_classes == 1000:
        lines.append(f"  load: DiTPipeline.from_pretrained({str(out)!r}); guidance works as usual (null class 1000)")
    else:
        lines += [
            f"  load with guidance: DiffusionPipeline.from_pretrained({str(out)!r}, custom_pipeline={str(out / 'pipeline_ditkit.py')!r}, trust_remote_code=True)"
            f" (DiTkitPipeline: null class {null} instead of DiTPipeline's hard-coded 1000)",
            f"  DiTPipeline.from_pretrained({str(out)!r}) also loads it, but only guidance_scale=1 works there",
        ]
    if not null_trained:
        lines.append("  this model never trained its null class (class_dropout_prob 0): use guidance_scale=1 in diffusers")
    if pipeline:
        lines.append(
            "  DiTPipeline samples with the scheduler in scheduler/ (DDIM by default), guides every latent channel"
            + (" and ignores the learned variance" if learn_sigma else "")
            + ": ditkit's sampler settings from the checkpoint are not carried over"
        )
    return "\n".join(lines)

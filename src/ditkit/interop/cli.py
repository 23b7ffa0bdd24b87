"""Command-line front ends of the interop room, for ``ditkit.cli`` to mount:

    ditkit import-dit DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --out runs/dit-xl-256
    ditkit export-diffusers --ckpt RUN_OR_CKPT --out folder [--vae path/to/sd-vae]

``register_cli(subparsers)`` adds both sub-commands; each sets ``args.func`` to a handler
``(args) -> exit code``. Errors are InteropError / ConfigError with the fix in the message.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register_cli", "cmd_import_dit", "cmd_export_diffusers"]


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def register_cli(subparsers: Any) -> None:
    """Add ``import-dit`` and ``export-diffusers`` to an argparse sub-parser collection."""
    imp = subparsers.add_parser(
        "import-dit", help="import an official facebookresearch/DiT checkpoint",
        description="Read an official DiT .pt (released weights or a training checkpoint, EMA used) "
        "and write a ditkit checkpoint directory. Omitted flags are read off the checkpoint.",
    )
    imp.add_argument("checkpoint", metavar="FILE.pt")
    imp.add_argument("--model", default=None, help="preset, e.g. DiT-XL/2 (default: inferred)")
    imp.add_argument("--image-size", type=int, default=None, help="pixels; latent = image-size / 8 (default: inferred)")
    imp.add_argument("--num-classes", type=int, default=None, help="default: inferred")
    imp.add_argument("--learn-sigma", type=_bool, default=None, metavar="true|false", help="default: inferred")
    imp.add_argument("--use-model-weights", action="store_true", help="training checkpoints: 'model' instead of 'ema'")
    imp.add_argument("--out", required=True, metavar="DIR")
    imp.set_defaults(func=cmd_import_dit)

    exp = subparsers.add_parser(
        "export-diffusers", help="write a checkpoint as a diffusers DiT (or DiTPipeline with --vae)",
        description="Write a DiTTransformer2DModel folder; with --vae a full DiTPipeline folder.",
    )
    exp.add_argument("--ckpt", required=True, metavar="RUN_OR_CKPT")
    exp.add_argument("--out", required=True, metavar="DIR")
    exp.add_argument("--vae", default=None, metavar="DIR", help="local AutoencoderKL folder: write a DiTPipeline")
    exp.set_defaults(func=cmd_export_diffusers)


def cmd_import_dit(args: argparse.Namespace) -> int:
    from ditkit.interop.common import save_imported
    from ditkit.interop.official import import_official_dit, read_official_checkpoint

    ckpt = read_official_checkpoint(args.checkpoint, use_ema=not args.use_model_weights)
    model = import_official_dit(
        ckpt, model=args.model, image_size=args.image_size, num_classes=args.num_classes, learn_sigma=args.learn_sigma
    )
    meta = ckpt.meta() | {"image_size": model.input_size * 8}
    out = save_imported(model, args.out, meta)
    print(json.dumps({"out": str(out), **meta}, indent=2))
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    from ditkit.interop.common import InteropError
    from ditkit.interop.diffusers_format import export_diffusers
    from ditkit.sampling import load_model

    model, cfg, ckpt_dir = load_model(args.ckpt)
    objective = cfg.objective
    if args.vae is not None and objective.kind != "gaussian":
        raise InteropError(
            f"{ckpt_dir} was trained with objective {objective.kind!r}; DiTPipeline runs Gaussian (DDPM) "
            "models only. Export without --vae to get the transformer folder alone"
        )
    out = export_diffusers(
        model, args.out, vae=args.vae, schedule=objective.schedule, num_timesteps=objective.num_timesteps,
        prediction=objective.prediction,
    )
    print(f"wrote {out} from {ckpt_dir}")
    return 0

"""``ditkit eval``: score a checkpoint's samples (or an ADM-style ``.npz``) against its training data.

    ditkit eval --ckpt results/digits --num-samples 1000
    ditkit eval --ckpt results/digits --num-samples 1000 --sampler ddim --num-sampling-steps 50 --cfg-scale 2
    ditkit eval --npz samples.npz --ckpt results/digits        # reference data from the checkpoint
    ditkit eval --npz samples.npz --data digits --image-size 16  # or named directly

Prints one summary line (``FD (classifier features) ... | precision ... | recall ... |
conditional accuracy ...``) and writes the results JSON (metrics, sample count, feature extractor
and its hash, tool versions, sampler, steps, cfg scale, checkpoint SHA-256, seed). Default output:
``RUN/eval/<step>-<sampler>-<steps>-cfg<scale>-n<N>-seed<seed>.json`` (``FILE.eval.json`` beside
an ``.npz``). The feature classifier and reference statistics are cached under
``$DITKIT_CACHE_DIR/eval`` (default ``~/.cache/ditkit/eval``) or ``--cache-dir``.

``register_cli(subparsers)`` adds the sub-command; its handler is ``args.func``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

__all__ = ["register_cli", "cmd_eval"]


def register_cli(subparsers: Any) -> None:
    """Add ``eval`` to an argparse sub-parser collection."""
    ev = subparsers.add_parser(
        "eval", help="score samples: FD (classifier features), precision/recall, conditional accuracy",
        description="Sample from a checkpoint (or read an ADM-style .npz) and score it against the training data.",
    )
    ev.add_argument("--ckpt", metavar="RUN_OR_CKPT", help="run directory (newest checkpoint) or checkpoint")
    ev.add_argument("--num-samples", type=int, default=1000, help="samples to draw (default 1000)")
    ev.add_argument("--sampler", choices=["auto", "ddpm", "ddim", "dpm++", "euler", "heun"], help="default: the checkpoint's")
    ev.add_argument("--num-sampling-steps", type=int)
    ev.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = none)")
    ev.add_argument("--timestep-spacing", choices=["uniform", "quadratic"], help="gaussian samplers (default: the checkpoint's)")
    ev.add_argument("--guide-channels", type=int, help="guide only the first N output channels")
    ev.add_argument("--seed", type=int, help="sample i uses seed + i (default: the checkpoint's sample.seed)")
    ev.add_argument("--batch-size", type=int, default=250)
    ev.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ev.add_argument("--vae", metavar="DIR", help="latent models: the AutoencoderKL folder (default: the recorded one)")
    ev.add_argument("--npz", metavar="FILE", help="score this ADM-style .npz (arr_0 uint8 NxHxWxC, arr_1 labels) instead")
    ev.add_argument("--data", metavar="PATH_OR_NAME", help="reference data for --npz without --ckpt")
    ev.add_argument("--image-size", type=int, help="with --data")
    ev.add_argument("--inception-weights", metavar="PATH", help="local pt_inception-2015-12-05 weights: adds FID and IS")
    ev.add_argument("--cache-dir", metavar="DIR", help="classifier / reference statistics cache (default ~/.cache/ditkit/eval)")
    ev.add_argument("--out", metavar="FILE.json", help="where to write the results")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    ev.set_defaults(func=cmd_eval)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(checkpoint config or None, reference config)``: the reference data is the checkpoint's
    training data, or ``--data`` (at ``--image-size``, default the checkpoint's resolution)."""
    from ditkit.config import Config, ConfigError
    from ditkit.sampling import load_checkpoint_config, resolve_checkpoint

    saved = load_checkpoint_config(resolve_checkpoint(args.ckpt)) if args.ckpt is not None else None
    if args.data is None:
        if saved is None:
            raise ConfigError("give --ckpt RUN (sample and score it) or --npz FILE with --ckpt RUN or --data NAME")
        return saved, saved
    reference = Config()
    reference.data.dataset = args.data
    if args.image_size is not None:
        reference.data.image_size = args.image_size
    elif saved is not None:
        reference.data.image_size = saved.data.image_size
    else:
        raise ConfigError("--data needs --image-size N (the resolution the samples were drawn at)")
    if saved is not None:
        reference.data.channels = saved.data.channels
    return saved, reference


def cmd_eval(args: argparse.Namespace) -> int:
    from ditkit.config import ConfigError
    from ditkit.device import resolve_device
    from ditkit.eval.evaluator import summarize, write_results_json
    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.sampling import ImageGenerator, check_sampling_options

    if args.num_samples < 10:
        raise ConfigError(f"--num-samples {args.num_samples}: use at least 10 (500-1000 gives stable numbers)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.inception_weights is not None:
        from ditkit.eval.inception import check_inception_weights

        try:
            check_inception_weights(args.inception_weights)
        except FileNotFoundError as err:  # the message says where the file comes from
            raise ConfigError(str(err)) from None
    device = resolve_device(args.device)
    saved, reference = _configs(args)

    if args.npz is not None:
        npz = Path(args.npz)
        if not npz.is_file():
            raise ConfigError(f"--npz {npz}: no such file")
        evaluator = build_evaluator(reference, cache=args.cache_dir, inception_weights=args.inception_weights, device=device, verbose=True)
        metadata = {"samples": str(npz), "samples_sha256": _sha256(npz), "checkpoint": args.ckpt}
        results = evaluator.evaluate(npz, None, metadata)
        out = Path(args.out) if args.out else npz.with_suffix(".eval.json")
    else:
        if saved is None:
            raise ConfigError("sampling needs --ckpt RUN (or score existing samples with --npz FILE)")
        # every check before the work: sampling options, then the model, then the reference data
        sampler, steps, cfg_scale = check_sampling_options(saved, args.sampler, args.num_sampling_steps, args.cfg_scale)
        generator = ImageGenerator.from_checkpoint(
            args.ckpt, use_ema=not args.no_ema, device=str(device), precision=args.precision, vae=args.vae
        )
        evaluator = build_evaluator(reference, cache=args.cache_dir, inception_weights=args.inception_weights, device=device, verbose=True)
        seed = saved.sample.seed if args.seed is None else args.seed
        results = evaluate_generator(
            generator, evaluator, args.num_samples, sampler=sampler, num_sampling_steps=steps, cfg_scale=cfg_scale,
            timestep_spacing=args.timestep_spacing, guide_channels=args.guide_channels, seed=seed,
            batch_size=args.batch_size,
        )
        if args.out:
            out = Path(args.out)
        else:
            s = results["sampling"]
            run_dir = generator.ckpt_dir.parent.parent
            name = f"{generator.ckpt_dir.name}-{s['sampler']}-{s['num_sampling_steps']}-cfg{s['cfg_scale']:g}-n{args.num_samples}-seed{seed}"
            out = run_dir / "eval" / f"{name}.json"
    write_results_json(results, out)
    print(summarize(results))
    print(f"wrote {out}")
    return 0

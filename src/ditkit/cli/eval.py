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

Text checkpoints get bits per character (the NELBO bound for masked diffusion), validity of the
synthetic corpora, distinct-n and tokens/s instead (``ditkit.eval.text_model``).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from ditkit.registry import COMMANDS, OBJECTIVES, SAMPLERS
from ditkit.fileio import write_text

__all__ = ["register", "cmd_eval"]


@COMMANDS.register("eval", order=40, summary="score samples: FD (classifier features), precision/recall, accuracy; text: bits/char")
def register(subparsers: Any) -> None:
    ev = subparsers.add_parser(
        "eval", help="score samples: FD (classifier features), precision/recall, conditional accuracy",
        description="Sample from a checkpoint (or read an ADM-style .npz) and score it against the training data.",
    )
    ev.add_argument("--ckpt", metavar="RUN_OR_CKPT", help="run directory (newest checkpoint) or checkpoint")
    ev.add_argument("--num-samples", type=int, default=1000, help="samples to draw (default 1000)")
    image_families = {o.family for o in OBJECTIVES.entries(modality="image")}
    ev.add_argument("--sampler", choices=["auto", *(s for s in SAMPLERS.names() if SAMPLERS.get(s).family in image_families)],
                    help="default: the checkpoint's")
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
    ev.add_argument("--i3d-weights", metavar="PATH", help="video: a local TorchScript I3D (i3d_torchscript.pt): adds FVD")
    ev.add_argument("--clip-model", metavar="DIR", help="text-to-image: a local Hugging Face CLIP folder: adds CLIP score")
    ev.add_argument("--cache-dir", metavar="DIR", help="classifier / reference statistics cache (default ~/.cache/ditkit/eval)")
    ev.add_argument("--out", metavar="FILE.json", help="where to write the results")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: as the run trained (bf16 only where native and measured to keep quality, docs/fast_sampling.md)")
    ev.add_argument("--allow-untrained-uncond", action="store_true", help="guide even without a trained unconditional branch")
    text = ev.add_argument_group("text models")
    text.add_argument("--num-passes", type=int, default=4, help="NELBO passes over the validation chunks (standard error)")
    text.add_argument("--max-val-sequences", type=int, help="score only the first N validation chunks")
    text.add_argument("--temperature", type=float, help="text samplers (default: the checkpoint's)")
    ev.set_defaults(func=cmd_eval, interrupted_message="aborted: no results written")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(checkpoint config or None, reference config)``: the reference data is the checkpoint's
    training data, or ``--data`` (at ``--image-size``, default the checkpoint's resolution)."""
    from ditkit.checkpoint_io import Checkpoint
    from ditkit.config import Config, ConfigError

    saved = Checkpoint.open(args.ckpt).config if args.ckpt is not None else None
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


def _refuse(args: argparse.Namespace, what: str, *attrs: str) -> None:
    """One-line ``ConfigError`` for the first flag in ``attrs`` given to an evaluation it is not for."""
    from ditkit.config import ConfigError

    for attr in attrs:
        if getattr(args, attr, None) is not None:
            raise ConfigError(f"--{attr.replace('_', '-')} is not an option of {what} evaluation: drop it")


def _write_json(results: dict[str, Any], out: Path) -> None:
    """Print the results and write them to ``out`` (via a temporary file: nothing half written)."""
    import json

    text = json.dumps(results, indent=2, ensure_ascii=False)
    write_text(out, text + "\n")
    print(text)
    print(f"wrote {out}")


def cmd_eval(args: argparse.Namespace) -> int:
    """Dispatch on the checkpoint's pipeline (``ditkit.pipelines.pipeline_name``): each modality's
    scores come from its own judges; ``--npz`` files are images."""
    if args.npz is not None or args.ckpt is None:
        return cmd_eval_image(args)
    from ditkit.checkpoint_io import Checkpoint
    from ditkit.pipelines import pipeline_name

    return EVALUATIONS[pipeline_name(Checkpoint.open(args.ckpt).config)](args)


def _cmd_eval_clips(args: argparse.Namespace, modality: str) -> int:
    """``ditkit eval`` on an audio or video checkpoint (``ditkit.eval.audio.evaluate_audio``: pocketsphinx
    digit accuracy, classifier accuracy and FD, real-time factor; ``ditkit.eval.video.evaluate_video``:
    per-frame digit accuracy, identity consistency, direction accuracy, FD beside the real-vs-real
    floor); prints and writes the JSON."""
    from ditkit.cache import cache_dir
    from ditkit.config import ConfigError
    from ditkit.pipelines import pipeline_class
    from ditkit.progress import progress_bar

    _refuse(args, modality, "data", "image_size", "inception_weights", "guide_channels", "temperature", "max_val_sequences",
            "clip_model", *(("i3d_weights", "vae") if modality == "audio" else ()))
    fvd_options = {"i3d_weights": args.i3d_weights} if modality == "video" and args.i3d_weights is not None else {}
    if modality == "audio" and args.num_samples < 10:
        raise ConfigError(f"--num-samples {args.num_samples}: use at least 10 (200 gives stable numbers)")
    from ditkit.checkpoint_io import Checkpoint

    checkpoint = Checkpoint.open(args.ckpt)
    pipe = pipeline_class(checkpoint.config).from_checkpoint(checkpoint, use_ema=not args.no_ema, device=args.device,
                                                             precision=args.precision,
                                                             **({"vae": args.vae} if args.vae is not None else {}))
    sampler, steps, cfg_scale, _ = pipe.check_options(args.sampler, args.num_sampling_steps, args.cfg_scale, args.timestep_spacing)
    pipe.check_plan_guidance(cfg_scale, [0] if pipe.num_classes else None, args.allow_untrained_uncond)  # before the judges train
    seed = pipe.cfg.sample.seed if args.seed is None else args.seed
    if modality == "video":
        from ditkit.eval.video import evaluate_video as evaluate

        batch, calls_per_batch = min(args.batch_size, 32), pipe.trained_frames * steps  # clips of F frames each
    else:
        from ditkit.eval.audio import evaluate_audio as evaluate

        batch, calls_per_batch = args.batch_size, steps
    with progress_bar(calls_per_batch * -(-args.num_samples // batch), f"sampling {modality} for evaluation") as bar:
        results = evaluate(pipe, args.num_samples, sampler=sampler, num_sampling_steps=steps, cfg_scale=cfg_scale, seed=seed,
                           batch_size=batch, cache_dir=args.cache_dir if args.cache_dir is not None else cache_dir("eval"),
                           progress=bar.update, allow_untrained_uncond=args.allow_untrained_uncond, **fvd_options)
    name = f"{pipe.checkpoint.dir.name}-{modality}-{sampler}-{steps}-cfg{cfg_scale:g}-n{args.num_samples}-seed{seed}"
    _write_json(results, Path(args.out) if args.out else pipe.checkpoint.run_dir / "eval" / f"{name}.json")
    return 0


def cmd_eval_image(args: argparse.Namespace) -> int:
    from ditkit.config import ConfigError
    from ditkit.device import resolve_device
    from ditkit.eval.evaluator import summarize, write_results_json
    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.pipelines.image import ImagePipeline

    _refuse(args, "image", "max_val_sequences", "temperature", "i3d_weights")
    if args.num_passes != 4:
        raise ConfigError("--num-passes is for text models: this is an image evaluation")

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
        # every check before the work: the model and its sampling options, then the reference data
        generator = ImagePipeline.from_checkpoint(
            args.ckpt, use_ema=not args.no_ema, device=str(device), precision=args.precision,
            **({"vae": args.vae} if args.vae is not None else {}),
        )
        sampler, steps, cfg_scale, _ = generator.check_options(
            args.sampler, args.num_sampling_steps, args.cfg_scale, args.timestep_spacing)
        generator.check_guidance(cfg_scale, args.allow_untrained_uncond)
        evaluator = build_evaluator(reference, cache=args.cache_dir, inception_weights=args.inception_weights, device=device, verbose=True)
        seed = saved.sample.seed if args.seed is None else args.seed
        from ditkit.progress import progress_bar

        with progress_bar(steps * -(-args.num_samples // args.batch_size), "sampling for evaluation") as bar:
            results = evaluate_generator(
                generator, evaluator, args.num_samples, sampler=sampler, num_sampling_steps=steps, cfg_scale=cfg_scale,
                timestep_spacing=args.timestep_spacing, guide_channels=args.guide_channels, seed=seed,
                batch_size=args.batch_size, progress=bar.update, allow_untrained_uncond=args.allow_untrained_uncond,
            )
        if args.out:
            out = Path(args.out)
        else:
            s = results["sampling"]
            ckpt_dir = generator.checkpoint.dir
            run_dir = generator.checkpoint.run_dir
            name = f"{ckpt_dir.name}-{s['sampler']}-{s['num_sampling_steps']}-cfg{s['cfg_scale']:g}-n{args.num_samples}-seed{seed}"
            out = run_dir / "eval" / f"{name}.json"
    write_results_json(results, out)
    print(summarize(results))
    print(f"wrote {out}")
    return 0


def cmd_eval_text(args: argparse.Namespace) -> int:
    """``ditkit eval`` on a text checkpoint (``ditkit.eval.text_model.evaluate_text``): prints the
    results as JSON and writes them to a file."""
    from ditkit.config import ConfigError
    from ditkit.eval.text_model import evaluate_text

    _refuse(args, "text", "data", "image_size", "inception_weights", "vae", "guide_channels", "timestep_spacing", "i3d_weights")
    if getattr(args, "sampler", None) not in (None, "auto"):
        raise ConfigError(f"--sampler {args.sampler} is an image sampler: text models use their own (drop --sampler)")
    results = evaluate_text(
        args.ckpt, num_samples=args.num_samples, num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
        temperature=args.temperature, seed=args.seed, num_passes=args.num_passes,
        max_val_sequences=args.max_val_sequences, batch_size=args.batch_size, use_ema=not args.no_ema,
        device=args.device, precision=args.precision,
    )
    ckpt_dir, s = Path(results["checkpoint"]), results["samples"]
    name = f"{ckpt_dir.name}-text-{s['sampler']}-{s['num_sampling_steps']}-n{s['num_samples']}-seed{s['seed']}.json"
    _write_json(results, Path(args.out) if args.out else ckpt_dir.parent.parent / "eval" / name)
    return 0


def _cmd_eval_text_to_image(args: argparse.Namespace) -> int:
    from ditkit.eval.attributes import cmd_eval_text_to_image  # the attribute judge (GenEval-style)

    _refuse(args, "text-to-image", "i3d_weights")

    return cmd_eval_text_to_image(args)


# The evaluation of each registered pipeline (``ditkit.registry.PIPELINES`` names).
EVALUATIONS = {
    "image": lambda args: cmd_eval_image(args),
    "text": lambda args: cmd_eval_text(args),
    "text_to_image": _cmd_eval_text_to_image,
    "audio": lambda args: _cmd_eval_clips(args, "audio"),
    "video": lambda args: _cmd_eval_clips(args, "video"),
    "text_to_video": lambda args: _cmd_eval_clips(args, "video"),
}

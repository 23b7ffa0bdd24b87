"""``ditkit train``: a recipe (or a config.json) plus flag overrides -> one run of the trainer;
``--resume RUN`` continues a run exactly where it stopped.

``--data PATH`` (an image folder or a ``.npz``/``.npy``) without ``--recipe`` trains recipe
``own_images`` sized for the data (``ditkit.recipes.size_for_dataset``: batch and steps from the
number of images); before training it prints the sizes and a time estimate measured by timing two
training steps of the real model on this machine. Flags still override every value.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

from ditkit.config import DIT_FLAGS, Config, ConfigError, apply_overrides, load_config, parse_set_option
from ditkit.registry import COMMANDS

__all__ = ["register", "train_config", "cmd_train", "count_images", "estimate_step_seconds", "check_init_from_convention"]


def _own_image_data(args: argparse.Namespace) -> Optional[Path]:
    """The ``--data`` path when it names the user's own images and no recipe/config/resume is given."""
    if args.recipe or args.config or args.resume or not hasattr(args, "data"):
        return None
    if any(item.replace(" ", "").startswith("data.captioned=") for item in args.set) or hasattr(args, "text_encoder"):
        return None  # captioned images train a prompt model: --recipe shapes_captions
    if _video_recipe(args) is not None:
        return None  # clips: a video recipe
    path = Path(args.data)
    from ditkit.config import BUILTIN_DATASETS

    if args.data in BUILTIN_DATASETS or not (path.is_dir() or path.suffix in (".npz", ".npy")):
        return None
    return path


def _video_recipe(args: argparse.Namespace) -> Optional[str]:
    """The recipe a recipe-less command that asks for video starts from (``--set data.num_frames=N``
    or a ``Latte-*`` / ``T2V-*`` model): ``moving_digits_captions`` for a text-to-video model, else
    ``moving_digits``; None otherwise."""
    model = str(getattr(args, "model", "") or "")
    frames = any(item.replace(" ", "").startswith("data.num_frames=") for item in args.set)
    if model.startswith("T2V-"):
        return "moving_digits_captions"
    return "moving_digits" if frames or model.startswith("Latte-") else None


def count_images(path: Path) -> int:
    """Images in a folder (files with an image extension, hidden ones skipped, as the loader reads
    them) or in a ``.npz``/``.npy`` array file (its first axis), without decoding them."""
    import numpy as np

    from ditkit.data.images import IMAGE_EXTENSIONS

    if path.is_dir():
        return sum(
            1 for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if not path.is_file():
        raise ConfigError(f"--data {path}: no such file or folder")
    try:
        if path.suffix == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in ("images", "arr_0", "x") if k in npz.files), None)
            return int(npz[key].shape[0]) if key is not None else 0
    except (OSError, ValueError) as err:
        raise ConfigError(f"--data {path}: cannot read it ({err})") from None


def estimate_step_seconds(cfg: Config, probe_steps: int = 3) -> float:
    """Seconds per training step of ``cfg``'s model at its batch size, device and precision,
    measured here: ``probe_steps`` AdamW steps on random data, the first one discarded (warm-up).
    Runs under a forked RNG, so the run that follows draws the same numbers as without it."""
    import time

    import torch

    from ditkit.builders import build_model, build_objective
    from ditkit.builders.dit import model_input_shape
    from ditkit.device import autocast, resolve_device, resolve_precision

    probe = Config.from_dict(cfg.to_dict())
    probe.data.channels = probe.data.channels or 3  # not known before loading: RGB is the upper bound
    probe.data.num_classes = 10 if probe.data.num_classes is None else probe.data.num_classes
    if probe.data.vae is not None and not probe.data.latent_channels:  # a Stable Diffusion VAE's latents
        probe.data.latent_channels, probe.data.vae_downsample = 4, 8
    device = resolve_device(cfg.train.device)
    dtype = resolve_precision(cfg.train.precision, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(probe).to(device).train()
        objective = build_objective(probe)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        channels, side = model_input_shape(probe)
        x = torch.rand(cfg.train.global_batch_size, channels, side, side, device=device) * 2 - 1
        y = (torch.randint(0, probe.data.num_classes, (cfg.train.global_batch_size,), device=device)
             if probe.data.num_classes else None)
        times = []
        for _ in range(max(2, probe_steps)):
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = objective.loss(model, x, y).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@COMMANDS.register("train", order=10, summary="train a DiT (or resume a run)")
def register(subparsers: Any) -> None:
    tr = subparsers.add_parser("train", help="train a DiT (or resume a run)",
                               description="Train a DiT on images or text from a recipe, a config.json, or a run to resume.")
    tr.add_argument("--recipe", help="start from a named recipe (default: digits, or own_images sized for --data PATH); "
                    "see --list-recipes")
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
    tr.add_argument("--text-encoder", default=S, metavar="DIR",
                    help="prompt models: condition on this frozen local Hugging Face / sentence-transformers encoder "
                         "(its outputs cached per caption) instead of training one")
    tr.add_argument("--num-frames", type=int, default=S, help="video: frames per training clip")
    tr.add_argument("--frame-stride", type=int, default=S, help="video: take every k-th frame of a clip")
    tr.add_argument("--duration", type=float, default=S, help="audio: seconds per training clip")
    tr.add_argument("--init-from", default=S, metavar="RUN_OR_FILE",
                    help="start from pretrained weights: a ditkit run, an official DiT .pt, a diffusers folder")
    tr.add_argument("--class-map", default=S, metavar="NEW:OLD,...", help="with --init-from: label rows to keep")
    tr.add_argument("--allow-lossy", action="store_true",
                    help="with --init-from: start from weights trained with another timestep_freq_shift (changes "
                         "every timestep embedding; default: refuse)")
    tr.add_argument("--lora-rank", type=int, default=S, metavar="R",
                    help="with --init-from: freeze the base and train rank-R LoRA adapters (docs/lora.md)")
    tr.add_argument("--lora-alpha", type=float, default=S, help="LoRA scale alpha / rank (default: the rank)")
    tr.add_argument("--lora-targets", default=S, metavar="PRESETS",
                    help="layers to adapt: attn, qkv, mlp, adaLN, cross_attn, final or patterns (default attn,mlp)")
    tr.add_argument("--lora-train-modules", default=S, metavar="MODULES",
                    help="with --lora-rank: also train these modules whole, saved in the adapter (peft's "
                         "modules_to_save): labels (the class-label table) or patterns over module names")
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
    if "train.time_budget" in overrides and "train.max_steps" not in overrides and "train.epochs" not in overrides:
        overrides["train.max_steps"] = None  # a budget alone sets the length: the recipe's steps would stop it first
        overrides["train.epochs"] = None

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
        own = _own_image_data(args)
        if own is not None:
            from ditkit.recipes import size_for_dataset

            cfg = size_for_dataset(get_recipe("own_images"), count_images(own))
        else:
            if hasattr(args, "data") and not args.recipe and not args.config and Path(args.data).suffix in (".txt", ".jsonl"):
                raise ConfigError(f"--data {args.data} is text: add a text recipe, e.g. --recipe pydoc_char")
            prompts = hasattr(args, "text_encoder") and not args.recipe  # --data FOLDER --text-encoder PATH
            video = None if args.recipe else _video_recipe(args)
            cfg = get_recipe(args.recipe or video or ("shapes_captions" if prompts else "digits"))
            if prompts and hasattr(args, "data") and Path(args.data).is_dir():
                overrides.setdefault("data.captioned", True)  # a folder of captioned images
            if str(overrides.get("model.name", "")).startswith("T2V-"):
                overrides.setdefault("data.captioned", True)  # a text-to-video model trains on captioned clips
    cfg = apply_overrides(cfg, overrides)
    if cfg.data.text_encoder and not cfg.model.name.startswith(("T2I-", "T2V-")):
        raise ConfigError(f"--text-encoder conditions prompt models (T2I-*, T2V-*), not {cfg.model.name}: "
                          "use --recipe shapes_captions, --recipe moving_digits_captions or a --model T2I-... preset")
    return cfg, ckpt


def check_init_from_convention(cfg: Config, allow_lossy: bool = False) -> None:
    """Refuse ``--init-from`` weights trained with another timestep sinusoid (diffusers' shift 1 vs
    the official 0) than the run builds, unless ``allow_lossy``: loading them into the other
    convention changes every timestep embedding, a silent loss the fine-tune starts from."""
    if cfg.train.init_from is None or cfg.modality != "image":
        return
    from ditkit.builders import model_family
    from ditkit.interop.common import source_timestep_freq_shift

    if model_family(cfg) != "dit":
        return
    source = source_timestep_freq_shift(cfg.train.init_from)
    ours = float(cfg.model.timestep_freq_shift or 0.0)
    if source is None or source == ours or allow_lossy:
        return
    raise ConfigError(
        f"--init-from {cfg.train.init_from} was trained with timestep_freq_shift={source:g} but this run builds "
        f"{ours:g}, which changes every timestep embedding: add --set model.timestep_freq_shift={source:g} "
        "(or --allow-lossy to start from it anyway)"
    )


def _announce_own_data(cfg: Config, path: Path) -> None:
    """Say what recipe ``own_images`` chose for ``path`` and how long it will take (measured)."""
    t = cfg.train
    n = count_images(path)
    steps = t.max_steps if t.max_steps is not None else -(-n // t.global_batch_size) * (t.epochs or 1)
    print(f"recipe own_images for {n:,} images in {path}: {cfg.model.name} at {cfg.data.image_size}x{cfg.data.image_size}, "
          f"batch {t.global_batch_size}, {steps:,} steps ({steps * t.global_batch_size / max(1, n):.0f} epochs); "
          "change with --global-batch-size, --max-steps, --model, --image-size", flush=True)
    try:
        per_step = estimate_step_seconds(cfg)
    except (RuntimeError, ValueError) as err:  # an estimate is a courtesy: never stop the run for it
        print(f"time estimate unavailable ({err})", flush=True)
        return
    print(f"estimated training time: {_duration(per_step * steps)} ({per_step:.2f} s/step measured here over 2 "
          "steps; sample grids and checkpoints add a little)", flush=True)


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
    if ckpt is None:
        check_init_from_convention(cfg, args.allow_lossy)
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ConfigError(f"--stop-at-step {args.stop_at_step}: must be at least 1")
    if args.print_config:
        print(cfg.to_json(), end="")
        return 0
    own = _own_image_data(args)
    if own is not None and os.environ.get("RANK", "0") == "0":
        _announce_own_data(cfg, own)
    result = train(cfg, resume=ckpt, stop_at_step=args.stop_at_step)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return EXIT_INTERRUPTED if result.interrupted else 0
    print(f"run: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    loss = "" if result.loss is None else f"  loss: {result.loss:.5f}"
    print(f"steps: {result.step}{loss}  wall time: {result.wall_time_s:.1f} s")
    if getattr(result, "stop_reason", None) == "budget":
        print(f"time budget spent: {result.steps_this_session} steps fitted in {result.train_s:.0f} s of training "
              f"this session ({result.step} in all)")
    samples = sorted((result.run_dir / "samples").glob("step_*")) if (result.run_dir / "samples").is_dir() else []
    if samples:
        print(f"samples: {samples[-1]}")
    return EXIT_INTERRUPTED if result.interrupted else 0

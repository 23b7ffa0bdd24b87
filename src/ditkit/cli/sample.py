"""``ditkit sample``: a checkpoint in, files out, through the pipeline of the checkpoint's modality.

Flags shared by every modality live here; each pipeline adds its own (``add_cli_arguments``) and
maps them to its call (``cli_call``). A flag given for a checkpoint of a modality that does not
take it is a one-line error naming both, generated from which pipeline added the flag.

The output folder is named by everything that changes the output (``RUN/samples/<checkpoint>-<hash
of the options>``), so two different requests never mix; writing into a non-empty folder needs
``--overwrite`` (which empties it first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from ditkit.config import ConfigError
from ditkit.errors import a_or_an
from ditkit.registry import COMMANDS, PIPELINES, SAMPLERS

__all__ = ["register", "cmd_sample", "output_dir"]

# argparse dests that do not change what is drawn (left out of the output folder's name)
_NOT_OUTPUT = {"ckpt", "out_dir", "overwrite", "device", "batch_size", "func", "command", "_subparsers", "blocklist",
               "interrupted_message", "_owners"}


class _Recorder:
    """Adds a pipeline's flags to the parser once and records which modalities take each dest."""

    def __init__(self, parser: argparse.ArgumentParser, group: Any, owners: dict[str, set[str]], modality: str) -> None:
        self.parser, self.group, self.owners, self.modality = parser, group, owners, modality

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if dest not in self.owners:
            self.group.add_argument(*flags, **kwargs)
            self.owners[dest] = set()
        self.owners[dest].add(self.modality)


@COMMANDS.register("sample", order=20, summary="generate from a checkpoint (images, text, ...)")
def register(subparsers: Any) -> None:
    sa = subparsers.add_parser("sample", help="generate from a checkpoint (images, text, ...)",
                               description="Sample from a checkpoint through the pipeline of its modality.")
    sa.add_argument("--ckpt", required=True, metavar="RUN_OR_CKPT", help="run directory (newest checkpoint) or checkpoint")
    sa.add_argument("--class-labels", nargs="+", metavar="LABEL", help="labels (numbers or class names), repeated to --num-samples")
    sa.add_argument("--num-samples", type=int, help="number of samples (default: the labels given, or 16)")
    sa.add_argument("--sampler", choices=["auto", *SAMPLERS.names()], help="default: the checkpoint's")
    sa.add_argument("--num-sampling-steps", "--num-inference-steps", dest="num_sampling_steps", type=int)
    sa.add_argument("--cfg-scale", "--guidance-scale", dest="cfg_scale", type=float,
                    help="classifier-free guidance scale (1 = none)")
    sa.add_argument("--allow-untrained-uncond", action="store_true",
                    help="guide even when the model never trained its unconditional branch (warns)")
    sa.add_argument("--seed", type=int, help="sample i uses seed + i (default: the checkpoint's sample.seed)")
    sa.add_argument("--batch-size", type=int, default=64)
    sa.add_argument("--out-dir", help="default: RUN/samples/<checkpoint>-<options hash>")
    sa.add_argument("--overwrite", action="store_true", help="write into a non-empty --out-dir (its files are removed)")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--device", default="auto")
    sa.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: as the run trained (bf16 only where native and measured to keep quality, docs/fast_sampling.md)")
    sa.add_argument("--blocklist", metavar="FILE",
                    help="safety rules (ditkit.safety) checked on the prompt and on generated text (off by default)")
    owners: dict[str, set[str]] = {a.dest: set(PIPELINES.names()) for a in sa._actions}
    for entry in PIPELINES.entries():
        group = sa.add_argument_group(f"{entry.name} models")
        entry.obj.add_cli_arguments(_Recorder(sa, group, owners, entry.name))
    sa.set_defaults(func=cmd_sample, _owners=owners, interrupted_message="aborted: nothing more is written")


def _refuse_foreign_flags(args: argparse.Namespace, parser_defaults: dict[str, Any], modality: str) -> None:
    for dest, modalities in args._owners.items():
        value = getattr(args, dest, None)
        if modality not in modalities and value not in (None, False) and value != parser_defaults.get(dest):
            flag = "--" + dest.replace("_", "-")
            names = sorted(m.replace("_", "-") for m in modalities)
            kinds = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            raise ConfigError(f"{flag} is for {kinds} models: this checkpoint is {a_or_an(modality.replace('_', '-'))} model")


def output_dir(args: argparse.Namespace, run_dir: Path, ckpt_name: str) -> Path:
    """``--out-dir``, else ``RUN/samples/<checkpoint>-<8 hex of the options that change the output>``."""
    if args.out_dir:
        return Path(args.out_dir)
    options = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_OUTPUT and v not in (None, False)}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return run_dir / "samples" / f"{ckpt_name}-{digest}"


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file: pick a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} already holds files (an earlier sample with the same options?): "
                              "pass --overwrite to replace them, or --out-dir NEW")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def cmd_sample(args: argparse.Namespace) -> int:
    from ditkit.checkpoint_io import Checkpoint
    from ditkit.pipelines import pipeline_class

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    ckpt = Checkpoint.open(args.ckpt)
    cls = pipeline_class(ckpt.config)
    defaults = {a.dest: a.default for a in args._subparsers["sample"]._actions}
    _refuse_foreign_flags(args, defaults, cls.modality)
    out = output_dir(args, ckpt.run_dir, ckpt.dir.name)
    blocklist = None
    if args.blocklist is not None:
        from ditkit.safety import Blocklist

        blocklist = Blocklist.from_file(args.blocklist)
        for attr in ("prompt", "negative_prompt", "suffix", "infill"):
            if getattr(args, attr, None):
                blocklist.enforce(getattr(args, attr), attr.replace("_", " "))
    from ditkit.train.distributed import setup_sampling

    procs = setup_sampling(args.device) if cls.supports_distributed else None
    try:
        if out is not None and (procs is None or procs.is_main):
            _prepare(out, args.overwrite)  # before any work: refuse to mix two requests' files
        device = str(procs.device) if procs is not None and procs.active else args.device
        pipe = cls.from_checkpoint(ckpt, device=device, precision=args.precision, use_ema=not args.no_ema,
                                   **cls.cli_extras(args))
        output = pipe.cli_call(args, distributed=procs is not None and procs.active)
    finally:
        if procs is not None:
            procs.close()
    if procs is not None and not procs.is_main:
        return 0
    if blocklist is not None:  # generated text is screened before anything is written
        for text in getattr(output, "texts", []) or []:
            blocklist.enforce(text, "generated text")
    written = pipe.cli_save(output, args, out)
    print(pipe.cli_summary(output))
    for path in written[:3]:
        print(f"wrote {path}")
    if len(written) > 3:
        print(f"wrote {len(written) - 3} more files in {out}")
    return 0

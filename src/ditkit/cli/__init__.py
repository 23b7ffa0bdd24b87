"""The ``ditkit`` command (also ``python -m ditkit``): one module per subcommand in this folder, each
registered the same way in ``ditkit.registry.COMMANDS``::

    @COMMANDS.register("info", order=40, summary="describe a run or checkpoint")
    def register(subparsers) -> None: ...          # adds the subparser and sets func=handler

Examples::

    ditkit train --recipe digits                       # the main job, ~10 min on 2 CPU cores
    ditkit train --resume results/digits               # continue exactly where it stopped
    ditkit sample --ckpt results/digits --class-labels 1 2 3 --num-samples 12
    ditkit sample --ckpt results/sums --prompt "3+4=" --num-tokens 12
    ditkit info results/digits
    ditkit eval --ckpt results/digits --num-samples 1000
    ditkit import-dit DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --out runs/dit-xl-256
    ditkit export-diffusers runs/dit-xl-256 out/dit-xl-256 --vae path/to/sd-vae-ft-ema --allow-lossy
    ditkit serve --ckpt results/digits

Flags shared with the official DiT scripts keep their names (``--model --image-size
--num-classes --global-batch-size --global-seed --epochs --log-every --ckpt-every --results-dir``;
``--ckpt --cfg-scale --num-sampling-steps --seed``). Bad input stops before any work with one line
that says what to change (exit status 2); output piped into a program that exits early ends quietly.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Optional, Sequence

from ditkit.config import ConfigError
from ditkit.registry import COMMANDS

__all__ = ["main", "build_parser", "Parser", "EXIT_USAGE", "EXIT_FAILED", "EXIT_INTERRUPTED"]

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class Parser(argparse.ArgumentParser):
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
    """The parser with every registered command, in their ``order``."""
    parser = Parser(prog="ditkit", description="Diffusion Transformers: train, sample, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    parser.set_defaults(_subparsers=sub.choices)  # lets main() report unknown flags per command
    for entry in sorted(COMMANDS.entries(), key=lambda e: e.meta.get("order", 100)):
        entry.obj(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ditkit`` command line; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader of our output exited early (`ditkit info --json RUN | head`): end quietly, as
        # Unix tools do; point stdout at /dev/null so the interpreter's final flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the subcommand's parser, which knows its flags for the hint
            args._subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return int(exit_.code or 0)
    from ditkit.train.loop import NonFiniteLossError

    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return status
    except ConfigError as err:
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        what = getattr(args, "interrupted_message", "aborted")
        print(f"ditkit {args.command}: {what}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

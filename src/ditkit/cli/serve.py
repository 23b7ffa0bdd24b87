"""``ditkit serve``: flags here, work in ``ditkit.serve.launch`` (imported only when the command runs,
so other commands never need FastAPI)."""

from __future__ import annotations

import argparse
from typing import Any

from ditkit.serve.limits import ServeLimits

from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_serve"]


@COMMANDS.register("serve", order=70, summary="HTTP API and web page over checkpoints")
def register(subparsers: Any) -> None:
    """Add ``serve``."""
    d = ServeLimits()
    sv = subparsers.add_parser(
        "serve", help="HTTP API and web page over checkpoints (needs ditkit[serve])",
        description="Serve checkpoints over HTTP: a web page at /, a JSON API under /v1 (schema at /openapi.json). "
        "Only the checkpoints given here are served; clients choose among them by name.",
    )
    sv.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]RUN_OR_CKPT",
                    help="a run directory (its newest checkpoint) or checkpoint; repeat to serve several")
    sv.add_argument("--lora", action="append", default=[], metavar="NAME=PATH[:WEIGHT]",
                    help="a LoRA adapter loaded once into the image models it fits; a request picks it with \"lora\": NAME")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sv.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: as the run trained (bf16 only where native and measured to keep quality, docs/fast_sampling.md)")
    sv.add_argument("--no-ema", action="store_true", help="serve the raw weights instead of the EMA")
    lim = sv.add_argument_group("limits per request (over a limit: HTTP 422 naming it)")
    lim.add_argument("--max-images", type=int, default=d.max_images_per_request, help="images per request")
    lim.add_argument("--max-steps", type=int, default=d.max_steps, help="sampling steps per request")
    lim.add_argument("--max-cfg-scale", type=float, default=d.max_cfg_scale, help="guidance scale range is 0..this")
    lim.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help="text prompt / template length")
    lim.add_argument("--max-text-length", type=int, default=d.max_text_length, help="tokens generated per text sample")
    lim.add_argument("--max-text-samples", type=int, default=d.max_text_samples, help="text samples per request")
    load = sv.add_argument_group("load")
    load.add_argument("--max-queue", type=int, default=d.max_queue,
                      help="waiting requests per model; more answer 503 with Retry-After")
    load.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="SECONDS",
                      help="a request still unfinished after this answers 504 and its work stops")
    load.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies answer 413")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument("--blocklist", metavar="FILE",
                    help="safety rules (one per line, `name: word` or `name: re:regex`) for prompts and generated text; "
                         "default: the filter is on with an empty list")
    sv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ditkit.serve.launch import run_server

    limits = ServeLimits(
        max_images_per_request=args.max_images, max_steps=args.max_steps, max_cfg_scale=args.max_cfg_scale,
        max_prompt_chars=args.max_prompt_chars, max_text_length=args.max_text_length,
        max_text_samples=args.max_text_samples, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    run_server(args.ckpt, host=args.host, port=args.port, limits=limits, device=args.device,
               precision=args.precision, use_ema=not args.no_ema, log_level=args.log_level, blocklist=args.blocklist,
               loras=args.lora)
    return 0

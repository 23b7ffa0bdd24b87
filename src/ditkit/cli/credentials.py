"""``ditkit credentials init DIR`` and ``ditkit verify IMAGE``: C2PA Content Credentials for what
ditkit makes (``ditkit.provenance``, on the ``c2pa-python`` library).

    ditkit credentials init keys/          # a local test CA and signing certificate (self-signed!)
    ditkit sample --ckpt RUN --c2pa-cert keys/cert.pem --c2pa-key keys/key.pem
    ditkit verify results/RUN/samples/.../000000.png [--trust-anchors keys/root.pem]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditkit.registry import COMMANDS

__all__ = ["register", "cmd_credentials", "cmd_verify"]


@COMMANDS.register("credentials", order=80, summary="make a local test signing pair; verify an image's C2PA credentials")
def register(subparsers: Any) -> None:
    cr = subparsers.add_parser("credentials", help="C2PA signing credentials: `init DIR` makes a local test pair",
                               description="Make a local, self-signed C2PA test certificate chain and key.")
    crs = cr.add_subparsers(dest="action", required=True)
    init = crs.add_parser("init", help="write a self-signed test CA, certificate chain and key into DIR")
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--days", type=int, default=365)
    init.add_argument("--overwrite", action="store_true", help="replace credentials already in DIR")
    cr.set_defaults(func=cmd_credentials)
    ve = subparsers.add_parser("verify", help="read and validate an image's C2PA manifest",
                               description="Read and validate the C2PA Content Credentials of an image.")
    ve.add_argument("image", metavar="IMAGE")
    ve.add_argument("--trust-anchors", metavar="PEM", help="root certificates to trust (e.g. the root.pem of init)")
    ve.add_argument("--json", action="store_true", help="print the whole report as JSON")
    ve.set_defaults(func=cmd_verify)


def cmd_credentials(args: argparse.Namespace) -> int:
    from ditkit.provenance import SELF_SIGNED_NOTICE, make_self_signed

    creds = make_self_signed(args.directory, days=args.days, overwrite=args.overwrite)
    for name, value in vars(creds).items():
        print(f"{name:12s} {value}")
    print(SELF_SIGNED_NOTICE)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the manifest is valid, 1 when it is missing or invalid (the report says why)."""
    from ditkit.provenance import verify

    report = verify(args.image, trust_anchors=args.trust_anchors)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            if key != "manifest":
                print(f"{key:18s} {value}")
    return 0 if report.get("valid") else 1

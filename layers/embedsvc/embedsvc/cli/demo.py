"""`embedsvc demo`: the end-to-end demo, which parses its own arguments (see `embedsvc.local.demo`)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    """Hand the demo its own arguments."""
    from embedsvc.local.demo import run

    return run(list(args.demo_args))


def add_demo_parser(commands: Any) -> None:
    """Register `demo` on the CLI's subparsers (listed in --help; `main` hands it argv directly)."""
    demo = commands.add_parser(
        "demo",
        help="the end-to-end demo on the embedded defaults (see: embedsvc demo --help)",
        add_help=False,
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)

"""`embedsvc demo-migration`: the model migration demo, which parses its own arguments."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_demo_migration(args: argparse.Namespace) -> int:
    """Hand the migration demo its own arguments (see `embedsvc.local.demo_migration`)."""
    from embedsvc.local.demo_migration import run

    return run(list(args.demo_args))


def add_demo_migration_parser(commands: Any) -> None:
    """Register `demo-migration` on the CLI's subparsers (listed in --help; `main` hands it argv directly)."""
    demo = commands.add_parser(
        "demo-migration",
        help="a model migration under search and write load, and the gate refusing a weaker model",
        add_help=False,
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo_migration)

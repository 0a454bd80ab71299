"""`embedsvc`: the operator CLI (local stack, API keys, queue, evaluation).

Run `embedsvc --help`, or `embedsvc COMMAND --help` for each command.
"""

from __future__ import annotations

import argparse
import sys

from embedsvc.cli.budgets import add_budgets_parser
from embedsvc.cli.consistency import add_consistency_parsers
from embedsvc.cli.costs import add_costs_parser
from embedsvc.cli.db import add_db_parser
from embedsvc.cli.demo import add_demo_parser, cmd_demo
from embedsvc.cli.demo_migration import add_demo_migration_parser, cmd_demo_migration
from embedsvc.cli.enqueue import add_enqueue_parser
from embedsvc.cli.keys import add_keys_parser
from embedsvc.cli.migrate import add_migrate_parser
from embedsvc.cli.models import add_models_parser
from embedsvc.cli.serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    """The `embedsvc` argument parser, with every command."""
    parser = argparse.ArgumentParser(
        prog="embedsvc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(commands)
    add_demo_parser(commands)
    add_demo_migration_parser(commands)
    add_keys_parser(commands)
    add_budgets_parser(commands)
    add_enqueue_parser(commands)
    add_db_parser(commands)
    add_models_parser(commands)
    add_consistency_parsers(commands)
    add_costs_parser(commands)
    add_migrate_parser(commands)
    try:
        from embedsvc.cli.eval import add_eval_parser
    except ImportError:  # an install without the evaluation's dependencies still runs the other commands
        pass
    else:
        add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 with a message for a service error)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        # The demo has its own parser (and --help); hand it everything after the command.
        return cmd_demo(argparse.Namespace(demo_args=argv[1:]))
    if argv[:1] == ["demo-migration"]:
        return cmd_demo_migration(argparse.Namespace(demo_args=argv[1:]))
    args = build_parser().parse_args(argv)
    from embedsvc.errors import EmbedServiceError

    try:
        return int(args.func(args) or 0)
    except EmbedServiceError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]

"""`embedsvc db upgrade|status`: the content store's schema migrations (DATABASE_URL or DATABASE_SECRET_ARN)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply the migrations not yet applied; prints what it applied (idempotent)."""
    from embedsvc import container
    from embedsvc.db.migrations import upgrade

    applied = upgrade(container.database())
    print(json.dumps({"applied": applied}))
    return 0


def cmd_db_status(args: argparse.Namespace) -> int:
    """Which migrations are applied and which are pending."""
    from embedsvc import container
    from embedsvc.db.migrations import applied, available

    done = applied(container.database())
    print(
        json.dumps(
            {
                "applied": [m.name for m in available() if m.version in done],
                "pending": [m.name for m in available() if m.version not in done],
            }
        )
    )
    return 0


def add_db_parser(commands: Any) -> None:
    """Register `db upgrade` and `db status`."""
    db = commands.add_parser("db", help="content store schema: upgrade, status (uses DATABASE_URL)")
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    actions.add_parser(
        "upgrade", help="apply pending migrations (recorded in schema_migrations)"
    ).set_defaults(func=cmd_db_upgrade)
    actions.add_parser("status", help="list applied and pending migrations").set_defaults(func=cmd_db_status)

"""`embedsvc keys create|revoke`: API keys, stored as SHA-256 hashes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key and print it once."""
    from embedsvc import container

    key = container.api_keys().create(tenant_id=args.tenant, user_id=args.user, name=args.name or "")
    print(json.dumps({"api_key": key, "tenant_id": args.tenant, "user_id": args.user}))
    print("Store this key now: only its hash is kept.", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke the key read from stdin."""
    from embedsvc import container

    # The key is read from stdin, never from argv, where shell history and `ps` would keep it.
    key = sys.stdin.readline().strip()
    if not key:
        print("error: give the key to revoke on stdin", file=sys.stderr)
        return 2
    container.api_keys().revoke(key)
    print("revoked", file=sys.stderr)
    return 0


def add_keys_parser(commands: Any) -> None:
    """Register `keys create` and `keys revoke` on the CLI's subparsers."""
    keys = commands.add_parser("keys", help="manage API keys (stored as SHA-256 hashes)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key for a tenant and user; prints it once")
    create.add_argument("--tenant", required=True, help="tenant id the key's requests belong to")
    create.add_argument("--user", required=True, help="user id for cost attribution")
    create.add_argument("--name", help="a label for the key")
    create.set_defaults(func=cmd_keys_create)
    revoke = key_commands.add_parser(
        "revoke", help='revoke a key read from stdin: echo "$KEY" | embedsvc keys revoke'
    )
    revoke.set_defaults(func=cmd_keys_revoke)

"""`embedsvc serve`: the local stack (the API and the queue worker) until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the local stack until interrupted."""
    from embedsvc.local.stack import LocalStack

    with LocalStack(args.workdir, port=args.port, run_poller=not args.no_worker) as stack:
        print(f"serving {stack.api_url}  (API key: $LOCAL_API_KEY, default {stack.api_key!r})", flush=True)
        if stack.database is not None:
            # Never the URL itself: it may hold a password.
            print(f"content store: Postgres ({stack.database.kind}, see README 'Local Postgres')", flush=True)
        print("index queue worker: " + ("off" if args.no_worker else "on") + "; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def add_serve_parser(commands: Any) -> None:
    """Register `serve` on the CLI's subparsers."""
    serve = commands.add_parser(
        "serve", help="run the local stack: the API on http://127.0.0.1:PORT/v1 and the queue worker"
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT", 3000)),
        help="HTTP port (default: $PORT or 3000)",
    )
    serve.add_argument(
        "--workdir",
        type=Path,
        default=Path(".local/serve"),
        help="local state: Qdrant files, EMF log (default: %(default)s)",
    )
    serve.add_argument("--no-worker", action="store_true", help="do not poll IndexQueue")
    serve.set_defaults(func=cmd_serve)

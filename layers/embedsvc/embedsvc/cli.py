"""`embedsvc`: the operator CLI (local stack, API keys, queue, evaluation).

Run `embedsvc --help`, or `embedsvc COMMAND --help` for each command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> int:
    from embedsvc.local.stack import LocalStack

    with LocalStack(args.workdir, port=args.port, run_poller=not args.no_worker) as stack:
        print(f"serving {stack.api_url}  (API key: $LOCAL_API_KEY, default {stack.api_key!r})", flush=True)
        print("index queue worker: " + ("off" if args.no_worker else "on") + "; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from embedsvc.local.demo import run

    return run(list(args.demo_args))


def cmd_keys_create(args: argparse.Namespace) -> int:
    from embedsvc import container

    key = container.api_keys().create(tenant_id=args.tenant, user_id=args.user, name=args.name or "")
    print(json.dumps({"api_key": key, "tenant_id": args.tenant, "user_id": args.user}))
    print("Store this key now: only its hash is kept.", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from embedsvc import container

    # The key is read from stdin, never from argv, where shell history and `ps` would keep it.
    key = sys.stdin.readline().strip()
    if not key:
        print("error: give the key to revoke on stdin", file=sys.stderr)
        return 2
    container.api_keys().revoke(key)
    print("revoked", file=sys.stderr)
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Send index messages (JSON lines) to IndexQueue, validating each first."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.services.indexing import PermanentError, parse_message

    settings = container.settings()
    if not settings.index_queue_url:
        print("error: INDEX_QUEUE_URL is not set", file=sys.stderr)
        return 2
    sqs = client("sqs")
    sent, bad, failed = 0, 0, 0

    def send(entries: list[dict], sent: int, failed: int) -> tuple[int, int]:
        answer = sqs.send_message_batch(QueueUrl=settings.index_queue_url, Entries=entries)
        for entry in answer.get("Failed", []):  # SQS accepts a batch partly: report, never count as sent
            print(
                f"not sent: {entries[int(entry['Id'])]['MessageBody'][:80]}: {entry.get('Message')}",
                file=sys.stderr,
            )
        return sent + len(answer.get("Successful", [])), failed + len(answer.get("Failed", []))

    batch: list[dict] = []
    source = sys.stdin if str(args.file) == "-" else Path(args.file).open()  # noqa: SIM115 (closed below)
    with source:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                parse_message(line, settings)
            except PermanentError as exc:
                print(f"line {number}: {exc}", file=sys.stderr)
                bad += 1
                continue
            batch.append({"Id": str(len(batch)), "MessageBody": line.strip()})
            if len(batch) == 10:
                sent, failed = send(batch, sent, failed)
                batch = []
    if batch:
        sent, failed = send(batch, sent, failed)
    print(json.dumps({"sent": sent, "rejected": bad, "failed": failed}))
    return 1 if bad or failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedsvc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    demo = commands.add_parser(
        "demo",
        help="the end-to-end demo on the embedded defaults (see: embedsvc demo --help)",
        add_help=False,
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)

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

    enqueue = commands.add_parser(
        "enqueue", help="validate and send index messages (JSON lines) to IndexQueue"
    )
    enqueue.add_argument("file", help="a JSON-lines file of index messages, or - for stdin")
    enqueue.set_defaults(func=cmd_enqueue)

    try:
        from embedsvc.services.evaluation.cli import add_eval_parser
    except ImportError:
        pass
    else:

        def cmd_eval(args: argparse.Namespace) -> int:
            from embedsvc.services.evaluation.service import run_cli

            return run_cli(args)

        add_eval_parser(commands).set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        # The demo has its own parser (and --help); hand it everything after the command.
        return cmd_demo(argparse.Namespace(demo_args=argv[1:]))
    args = build_parser().parse_args(argv)
    from embedsvc.errors import EmbedServiceError

    try:
        return int(args.func(args) or 0)
    except EmbedServiceError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

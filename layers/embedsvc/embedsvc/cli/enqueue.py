"""`embedsvc enqueue`: validate index messages (JSON lines) and send them to IndexQueue."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


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


def add_enqueue_parser(commands: Any) -> None:
    """Register `enqueue` on the CLI's subparsers."""
    enqueue = commands.add_parser(
        "enqueue", help="validate and send index messages (JSON lines) to IndexQueue"
    )
    enqueue.add_argument("file", help="a JSON-lines file of index messages, or - for stdin")
    enqueue.set_defaults(func=cmd_enqueue)

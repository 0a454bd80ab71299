"""Producer side of IndexQueue: index requests (usually by id) sent in batches of ten."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_lambda_powertools import Logger

from embedsvc.models.messages import IndexMessage
from embedsvc.observability import current_correlation_id

logger = Logger(child=True)

SQS_MAX_MESSAGE_BYTES = 256 * 1024


class IndexQueue:
    def __init__(self, queue_url: str | None, sqs: Any):
        self.queue_url = queue_url
        self.sqs = sqs

    def send(self, messages: Sequence[IndexMessage]) -> list[int]:
        """Send messages; returns the indexes of those that were not sent (never raises for SQS's sake).

        A caller that gets indexes back still has its content committed: the repair job finds what
        the queue missed, so a failed send is a delay, never a loss.
        """
        if not messages:
            return []
        if not self.queue_url:
            logger.error("no INDEX_QUEUE_URL configured; index requests wait for the repair job")
            return list(range(len(messages)))
        if correlation_id := current_correlation_id():  # the producing request's or run's
            messages = [
                m if m.correlation_id else m.model_copy(update={"correlation_id": correlation_id})
                for m in messages
            ]
        unsent: list[int] = []
        for start in range(0, len(messages), 10):  # SendMessageBatch takes ten entries
            chunk = list(range(start, min(start + 10, len(messages))))
            entries = []
            for i in chunk:
                body = messages[i].model_dump_json(exclude_none=True)
                if len(body.encode()) > SQS_MAX_MESSAGE_BYTES:
                    unsent.append(i)  # SQS would refuse it; by-id requests never get here
                    continue
                entries.append({"Id": str(i), "MessageBody": body})
            if not entries:
                continue
            try:
                answer = self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
                unsent += [int(f["Id"]) for f in answer.get("Failed", [])]
            except Exception as exc:
                logger.warning("IndexQueue send failed", extra={"error": type(exc).__name__})
                unsent += [int(e["Id"]) for e in entries]
        return sorted(unsent)

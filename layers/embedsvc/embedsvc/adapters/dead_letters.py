"""The index DLQ: messages that can never succeed go there with their reason, each message id once.

A Lambda that times out after dead-lettering part of a batch has the whole batch redelivered; without
a record of what was sent, the same poison would be dead-lettered again on every redelivery. Each send
is recorded in the state table (`dlq#<message id>`, kept as long as the DLQ keeps messages), and ids
found there are acknowledged without a second send. The record is written after the send, so a crash
between the two can still duplicate a DLQ entry, never lose one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from aws_lambda_powertools import Logger

logger = Logger(child=True)

DLQ_RETENTION_SECONDS = 14 * 24 * 3600  # IndexDLQ's MessageRetentionPeriod
_BATCH_GET = 100
_BATCH_WRITE = 25


class Dead(Protocol):
    """A message as the worker holds it (embedsvc.services.indexing.Incoming)."""

    @property
    def message_id(self) -> str: ...

    @property
    def body(self) -> str: ...


class DeadLetterMarks:
    """Which message ids this deployment has already dead-lettered (DynamoDB, with a TTL)."""

    def __init__(self, table_name: str, client: Any, *, clock=time.time):
        self.table_name = table_name
        self.client = client
        self.clock = clock

    @staticmethod
    def _key(message_id: str) -> dict:
        return {"pk": {"S": f"dlq#{message_id}"}}

    def sent(self, message_ids: Sequence[str]) -> set[str]:
        """The ids among `message_ids` already sent to the DLQ (consistent reads)."""
        found: set[str] = set()
        ids = list(dict.fromkeys(message_ids))
        for start in range(0, len(ids), _BATCH_GET):
            request: dict = {
                self.table_name: {
                    "Keys": [self._key(m) for m in ids[start : start + _BATCH_GET]],
                    "ConsistentRead": True,
                }
            }
            for _ in range(5):
                answer = self.client.batch_get_item(RequestItems=request)
                for item in answer.get("Responses", {}).get(self.table_name, []):
                    found.add(item["pk"]["S"].removeprefix("dlq#"))
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    break
        return found

    def record(self, message_ids: Sequence[str]) -> None:
        """Remember that these ids went to the DLQ, for as long as the DLQ keeps them."""
        expires = str(int(self.clock()) + DLQ_RETENTION_SECONDS)
        items = [
            {"PutRequest": {"Item": {**self._key(m), "expires_at": {"N": expires}}}} for m in message_ids
        ]
        for start in range(0, len(items), _BATCH_WRITE):
            request = {self.table_name: items[start : start + _BATCH_WRITE]}
            for _ in range(5):
                answer = self.client.batch_write_item(RequestItems=request)
                request = answer.get("UnprocessedItems") or {}
                if not request:
                    break


class DeadLetterQueue:
    """Sends (message, reason) pairs to the DLQ: the original body, the reason and origin as attributes."""

    def __init__(self, queue_url: str | None, sqs_client: Any, marks: DeadLetterMarks | None = None):
        self.queue_url = queue_url
        self.sqs = sqs_client
        self.marks = marks

    def __call__(self, items: Sequence[tuple[Dead, str]]) -> list[str]:
        """Dead-letter the items; returns the ids that could not be sent (to be retried)."""
        if not items:
            return []
        if not self.queue_url:
            logger.error("no INDEX_DLQ_URL configured; poison messages will be retried until redrive")
            return [incoming.message_id for incoming, _ in items]
        already = self._already_sent([incoming.message_id for incoming, _ in items])
        if already:
            logger.info("messages already dead-lettered; not sent again", extra={"messages": len(already)})
        todo = [(incoming, reason) for incoming, reason in items if incoming.message_id not in already]
        unsent: list[str] = []
        for start in range(0, len(todo), 10):  # SendMessageBatch takes ten entries
            chunk = todo[start : start + 10]
            entries = [
                {
                    "Id": str(i),
                    "MessageBody": incoming.body or "<empty>",
                    "MessageAttributes": {
                        "failure_reason": {"DataType": "String", "StringValue": reason[:1024]},
                        "source_message_id": {"DataType": "String", "StringValue": incoming.message_id},
                        "failed_at": {"DataType": "Number", "StringValue": str(int(time.time()))},
                    },
                }
                for i, (incoming, reason) in enumerate(chunk)
            ]
            try:
                answer = self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
                unsent += [chunk[int(f["Id"])][0].message_id for f in answer.get("Failed", [])]
            except Exception as exc:
                logger.warning("DLQ send failed", extra={"error": repr(exc)})
                unsent += [incoming.message_id for incoming, _ in chunk]
        self._record([incoming.message_id for incoming, _ in todo if incoming.message_id not in unsent])
        return unsent

    def _already_sent(self, message_ids: list[str]) -> set[str]:
        if self.marks is None:
            return set()
        try:
            return self.marks.sent(message_ids)
        except Exception as exc:  # without the record, sending twice beats not sending
            logger.warning("could not read dead-letter records; sending anyway", extra={"error": repr(exc)})
            return set()

    def _record(self, message_ids: list[str]) -> None:
        if self.marks is None or not message_ids:
            return
        try:
            self.marks.record(message_ids)
        except Exception as exc:
            logger.warning(
                "could not record dead-lettered messages; a redelivery may send them again",
                extra={"error": repr(exc)},
            )


def create_state_table(client: Any, table_name: str) -> None:
    """Create the state table as template.yaml does (partition key `pk`, TTL on `expires_at`); idempotent."""
    try:
        client.create_table(
            TableName=table_name,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    except client.exceptions.ResourceInUseException:
        return
    client.update_time_to_live(
        TableName=table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
    )

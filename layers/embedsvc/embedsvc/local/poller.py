"""A small poller that plays the SQS event source mapping against moto's SQS.

Batch size and batching window come from template.yaml (EmbedWorkerFunction's SQS event), so the
local stack batches the way Lambda will. Like the real mapping with ReportBatchItemFailures, it
deletes every message of a batch except those the handler reports as failed; those reappear after
a (locally shortened) visibility timeout, and moto's redrive policy moves them to the DLQ after
maxReceiveCount receives.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml

from embedsvc.local.lambda_context import LocalLambdaContext

RETRY_VISIBILITY_SECONDS = 2  # Lambda waits the queue's full visibility timeout; locally we retry sooner


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that reads CloudFormation short tags (!Ref, !GetAtt, !Sub...) as plain values."""


def _any_tag(loader, _suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)


_CfnLoader.add_multi_constructor("!", _any_tag)


def event_source_settings(template: Path, function: str = "EmbedWorkerFunction") -> tuple[int, float]:
    """(BatchSize, MaximumBatchingWindowInSeconds) of the function's SQS event in template.yaml."""
    doc = yaml.load(template.read_text(), Loader=_CfnLoader)
    events = doc["Resources"][function]["Properties"].get("Events", {})
    for event in events.values():
        if event.get("Type") == "SQS":
            props = event["Properties"]
            return int(props.get("BatchSize", 10)), float(props.get("MaximumBatchingWindowInSeconds", 0))
    raise ValueError(f"{function} has no SQS event in {template}")


class SqsPoller:
    def __init__(self, sqs_client, queue_url: str, handler, *, batch_size: int, window_seconds: float):
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.handler = handler
        self.batch_size = batch_size
        self.window = window_seconds
        self.batches = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def gather(self) -> list[dict]:
        """Receive until a full batch or the batching window closes (SQS gives at most 10 per call)."""
        messages: list[dict] = []
        deadline = time.monotonic() + self.window
        while len(messages) < self.batch_size and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(10, self.batch_size - len(messages)),
                WaitTimeSeconds=0 if messages or remaining <= 0 else 1,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            received = answer.get("Messages", [])
            messages += received
            if not received and (messages or remaining <= 0):
                break
            if time.monotonic() >= deadline and messages:
                break
        return messages

    def poll_once(self) -> int:
        """Deliver one batch to the handler; returns how many messages it carried."""
        messages = self.gather()
        if not messages:
            return 0
        event = {
            "Records": [
                {
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                    "body": m["Body"],
                    "attributes": m.get("Attributes", {}),
                    "messageAttributes": m.get("MessageAttributes", {}),
                    "md5OfBody": m.get("MD5OfBody", ""),
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:local-index-queue",
                    "awsRegion": "us-east-1",
                }
                for m in messages
            ]
        }
        try:
            answer = self.handler(event, LocalLambdaContext("embed-worker"))
            failed = {f["itemIdentifier"] for f in answer.get("batchItemFailures", [])}
        except Exception:
            failed = {m["MessageId"] for m in messages}  # a crashed invocation fails the whole batch
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(done[start : start + 10])
                ],
            )
        for m in messages:
            if m["MessageId"] in failed:
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url,
                    ReceiptHandle=m["ReceiptHandle"],
                    VisibilityTimeout=RETRY_VISIBILITY_SECONDS,
                )
        self.batches += 1
        return len(messages)

    def drain(self, *, idle_polls: int = 2, timeout_seconds: float = 3600) -> int:
        """Poll until the queue stays empty for `idle_polls` rounds; returns messages delivered."""
        delivered, idle = 0, 0
        deadline = time.monotonic() + timeout_seconds
        while idle < idle_polls and time.monotonic() < deadline:
            count = self.poll_once()
            delivered += count
            idle = idle + 1 if count == 0 else 0
        return delivered

    def start(self) -> SqsPoller:
        def loop() -> None:
            while not self._stop.is_set():
                if self.poll_once() == 0:
                    self._stop.wait(0.2)

        self._thread = threading.Thread(target=loop, name="sqs-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

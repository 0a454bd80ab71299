"""EmbedWorkerFunction: IndexQueue batches (SQS batch window) -> embeddings -> Qdrant, with per-message failures."""

from __future__ import annotations

import time

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.data_classes import SQSEvent
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.observability import bind_correlation, correlation_from_message_body, flush_costs
from embedsvc.services.indexing import Incoming

SAFETY_SECONDS = 10.0
logger = Logger()


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


tracer = Tracer()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)  # no payloads in traces
@flush_costs  # the batch's costs reach the roll-up before Lambda freezes the process
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    batch = [
        Incoming(record.message_id, record.body or "", _int_or_none(record.attributes.get("SentTimestamp")))
        for record in SQSEvent(event).records
    ]
    correlation = {m.message_id: correlation_from_message_body(m.body) for m in batch}
    # A batch from one request (an import) works under its id; a mixed batch under none, its per-record
    # lines below say which message came from which request.
    shared = set(correlation.values())
    bind_correlation(shared.pop() if len(shared) == 1 else None, logger=logger)
    # Leave time to answer: work not started 10 s before the timeout is returned for redelivery.
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - SAFETY_SECONDS
    outcome = container.indexer().process(batch, deadline=deadline)
    retry = set(outcome.retry)
    for incoming in batch:
        logger.set_correlation_id(correlation[incoming.message_id])
        status = (
            "retry"
            if incoming.message_id in retry
            else "dead_lettered"
            if incoming.message_id in outcome.dead_lettered
            else "done"
        )
        logger.info("message processed", extra={"message_id": incoming.message_id, "status": status})
    bind_correlation(None, logger=logger)
    logger.info(
        "batch processed",
        extra={
            "messages": len(batch),
            "indexed": outcome.indexed,
            "unchanged": outcome.unchanged,
            "stale": outcome.stale,
            "deleted": outcome.deleted,
            "dead_lettered": len(outcome.dead_lettered),
            "retry": len(outcome.retry),
        },
    )
    # ReportBatchItemFailures: only these are redelivered; everything else is deleted from the queue.
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in outcome.retry]}

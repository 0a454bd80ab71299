"""EmbedWorkerFunction: IndexQueue batches (SQS batch window) -> embeddings -> Qdrant, with per-message failures."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.data_classes import SQSEvent
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.services.indexing import Incoming

logger = Logger()
tracer = Tracer()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    batch = [
        Incoming(record.message_id, record.body or "", int(record.attributes.approximate_receive_count or 1))
        for record in SQSEvent(event).records
    ]
    outcome = container.indexer().process(batch)
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

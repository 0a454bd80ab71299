"""RepairFunction: hourly, check the rows changed since the last run against Qdrant and queue the gaps.

Invoked by EventBridge Scheduler (rate(1 hour)) with the input {} (events/repair/scheduled.json), or on
demand with the same payload. Every configured content type is checked from its own checkpoint; rows
whose points are missing, stale or still live after a delete get an index request by id on IndexQueue.

Answer: RepairReport.as_dict() - {"content_types": {...}, "checked", "queued", "deleted", "failed",
"ok", "seconds"}. A content type whose checkpoint could not move is an answer ("ok": false, its "error"),
not an exception: the next run checks the same window again, and RepairErrors = 1 (RepairIncompleteAlarm).
Failures before any content type is checked (Secrets Manager, the settings) raise: RepairFailedAlarm.
"""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.observability import bind_correlation, correlation_from_event

STOP_SECONDS = 60.0
logger = Logger()
tracer = Tracer()


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)  # no payloads in traces
def lambda_handler(event: Any, context: LambdaContext) -> dict:
    # One id per run (or the caller's correlation_id): its log lines and every index request it queues.
    bind_correlation(correlation_from_event(event, prefix="repair"), logger=logger, tracer=tracer)
    # Stop a minute before the timeout: the checkpoint then moves to where the run got, and the next
    # hourly run goes on from there (a first run over millions of rows may take several).
    remaining = context.get_remaining_time_in_millis() / 1000
    report = container.repair_job().run(deadline=time.monotonic() + max(remaining - STOP_SECONDS, 1.0))
    answer = report.as_dict()
    logger.info(
        "repair finished",
        extra={
            "ok": answer["ok"],
            "checked": answer["checked"],
            "queued": answer["queued"],
            "deleted": answer["deleted"],
            "failed": answer["failed"],
            "seconds": answer["seconds"],
        },
    )
    if not answer["ok"]:
        logger.warning(
            "repair left a checkpoint in place",
            extra={
                "errors": {
                    name: result.get("error")
                    for name, result in answer["content_types"].items()
                    if not result.get("checkpoint_advanced")
                }
            },
        )
    return answer

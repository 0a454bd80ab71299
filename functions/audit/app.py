"""AuditFunction: weekly, merge-join every row in Postgres with every point in its collections.

Invoked by EventBridge Scheduler (Sunday 02:00 UTC) with {"dry_run": false} (events/audit/weekly.json),
or on demand, e.g. {"content_type": "note", "dry_run": true} (events/audit/dry_run.json):
    content_type  one configured content type, or null/absent for all of them
    dry_run       true: count and report, change nothing (default false)
Missing and stale points get index requests on IndexQueue; orphaned points are removed unless they are
more than AUDIT_ORPHAN_MAX_SHARE of a collection, in which case nothing is removed and
AuditSafetyValveTripped = 1 is emitted. The report goes to AUDIT_REPORTS_BUCKET.

Answer: AuditReport.as_dict(). A payload of the wrong shape raises InvalidRequest.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.errors import InvalidRequest
from embedsvc.observability import bind_correlation, correlation_from_event

logger = Logger()
tracer = Tracer()


def parse_event(event: Any) -> tuple[str | None, bool]:
    """(content_type, dry_run) from the payload; a missing or empty payload audits everything for real."""
    if event is None:
        return None, False
    if not isinstance(event, dict):
        raise InvalidRequest("the audit payload must be a JSON object")
    unknown = sorted(set(event) - {"content_type", "dry_run"})
    if unknown:
        raise InvalidRequest(f"unknown audit payload fields: {', '.join(unknown)}", param=unknown[0])
    content_type = event.get("content_type")
    if content_type is not None and (not isinstance(content_type, str) or not content_type):
        raise InvalidRequest("content_type must be a content type's name or null", param="content_type")
    dry_run = event.get("dry_run", False)
    # Strictly a boolean: the string "false" must not turn into a run that deletes.
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false", param="dry_run")
    return content_type, dry_run


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)  # no payloads in traces
def lambda_handler(event: Any, context: LambdaContext) -> dict:
    # One id per run: its log lines and every index request it queues (the worker logs them under it).
    bind_correlation(correlation_from_event(event, prefix="audit"), logger=logger, tracer=tracer)
    content_type, dry_run = parse_event(event)
    report = container.audit_job().run(content_type=content_type, dry_run=dry_run)
    answer = report.as_dict()
    # The totals only: per-collection details are in the answer and the report in S3.
    totals = {k: v for k, v in answer.items() if v is None or isinstance(v, str | int | float)}
    logger.info("audit finished", extra={"content_type": content_type, "dry_run": dry_run, "totals": totals})
    return answer

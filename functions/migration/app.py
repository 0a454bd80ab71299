"""The migration state machine's Lambda tasks, one small handler per step (statemachines/migration.asl.json).

Each handler takes the state the workflow passes (`{"migration": {...}}` after Begin) and returns a small
JSON object the workflow's Choice states read. The work is in services/migration/steps.py.

Errors reach Step Functions by class name: every transient cause (Qdrant, Postgres, SQS, SSM, a
provider) is raised as `TransientError`, which the state machine retries with back-off; anything else
is caught and sends the workflow down its abort path (the old model alone, the new collection dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.errors import TransientError
from embedsvc.observability import bind_correlation, correlation_from_event, flush_costs

logger = Logger()
tracer = Tracer()
# The backfill step stops this long before its timeout, so that its last page's progress is saved.
BACKFILL_STOP_SECONDS = 30.0
THROTTLING = {
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
}


def step(fn: Callable[[dict, LambdaContext], dict]) -> Callable[[dict, LambdaContext], dict]:
    """A task handler: Powertools context, the migration as correlation id (its log lines, the backfill's
    messages and their worker logs, its cost records), costs flushed, transient errors under one name."""

    @wraps(fn)
    @logger.inject_lambda_context
    @tracer.capture_lambda_handler(capture_response=False)
    @flush_costs
    def handler(event: dict, context: LambdaContext) -> dict:
        migration = (event or {}).get("migration") or {}
        correlation = migration.get("migration_id") or correlation_from_event(event, prefix="migration")
        bind_correlation(correlation, logger=logger, tracer=tracer)
        try:
            return fn(event, context)
        except TransientError as exc:
            if type(exc) is TransientError:
                raise
            raise TransientError(f"{type(exc).__name__}: {exc.message}") from exc
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in THROTTLING:
                raise TransientError(f"AWS throttled: {exc.response['Error']['Code']}") from exc
            raise

    return handler


@step
def begin_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().begin(event["input"], event["execution"])


@step
def shadow_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().shadow(event["migration"])


@step
def backfill_handler(event: dict, context: LambdaContext) -> dict:
    seconds = max(context.get_remaining_time_in_millis() / 1000 - BACKFILL_STOP_SECONDS, 1.0)
    return container.migration_steps().backfill(event["migration"], seconds)


@step
def check_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().check(event["migration"])


@step
def validate_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().validate(event["migration"])


@step
def cutover_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().cutover(event["migration"])


@step
def window_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().window(event["migration"], event.get("previous"))


@step
def stop_dual_write_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().stop_dual_write(event["migration"], event["keep"])


@step
def finish_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().finish(event["migration"], event["outcome"], event.get("error"))


@step
def abort_handler(event: dict, context: LambdaContext) -> dict:
    return container.migration_steps().abort(event["migration"], event.get("error") or {})


@step
def rollback_handler(event: dict, context: LambdaContext) -> dict:
    """The rollback state machine's one task (and `embedsvc migrate rollback`): the alias goes back now."""
    content_type = (event or {}).get("content_type")
    if not isinstance(content_type, str) or not content_type:
        from embedsvc.errors import InvalidRequest

        raise InvalidRequest('the input must be {"content_type": "..."}', param="content_type")
    requested_by = str(event.get("requested_by") or "console")[:128]
    started = time.time()
    answer = container.migration_steps().request_rollback(content_type, requested_by)
    logger.info("rollback requested", extra={**answer, "seconds": round(time.time() - started, 3)})
    return answer


HANDLERS: dict[str, Callable[[Any, Any], Any]] = {
    "MigrationBegin": begin_handler,
    "MigrationShadow": shadow_handler,
    "MigrationBackfill": backfill_handler,
    "MigrationCheck": check_handler,
    "MigrationValidate": validate_handler,
    "MigrationCutover": cutover_handler,
    "MigrationWindow": window_handler,
    "MigrationStopDualWrite": stop_dual_write_handler,
    "MigrationFinish": finish_handler,
    "MigrationAbort": abort_handler,
    "MigrationRollback": rollback_handler,
}

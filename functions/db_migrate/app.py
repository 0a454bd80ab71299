"""DbMigrateFunction: the DbMigrations custom resource - applies the pending SQL migrations at deploy.

CloudFormation invokes it with a custom resource request (events/db_migrate/create.json) and waits for
the answer this handler PUTs to the request's pre-signed ResponseURL (the protocol of cfn-response,
written with urllib so the function needs nothing outside the standard library and the layer):
    Create, Update  embedsvc.db.migrations.upgrade on DATABASE_SECRET_ARN's database; SUCCESS with
                    Data {"Applied": <number applied now>}, FAILED with the error as the reason
    Delete          SUCCESS without connecting: the schema and its data stay with the database
The physical id is always "embedsvc-db-migrations", so an Update never makes CloudFormation delete
the "old" resource. Whatever happens, CloudFormation gets an answer; only a run killed at its timeout
leaves it waiting, until the resource's ServiceTimeout.
"""

from __future__ import annotations

import json
import time
import urllib.request
from urllib.parse import urlparse

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

PHYSICAL_RESOURCE_ID = "embedsvc-db-migrations"
# CloudFormation refuses a response body over 4 KiB; the reason is the only part that can grow.
MAX_REASON = 1000
SEND_ATTEMPTS = 3

logger = Logger()
tracer = Tracer()


def build_response(
    event: dict, context: LambdaContext, status: str, data: dict | None = None, reason: str | None = None
) -> dict:
    """The custom resource response body CloudFormation expects for this request."""
    return {
        "Status": status,
        "Reason": (reason or f"See the details in CloudWatch Logs: {context.log_stream_name}")[:MAX_REASON],
        "PhysicalResourceId": event.get("PhysicalResourceId") or PHYSICAL_RESOURCE_ID,
        "StackId": event["StackId"],
        "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
        "NoEcho": False,
        "Data": data or {},
    }


def send_response(url: str, body: dict) -> None:
    """PUT the response to the pre-signed URL, retrying briefly: an unsent answer stalls the deploy."""
    if urlparse(url).scheme != "https":
        raise ValueError("ResponseURL must be an https URL")
    payload = json.dumps(body).encode()
    # An empty Content-Type, as cfn-response sends: the URL's signature does not cover one.
    request = urllib.request.Request(url, data=payload, method="PUT", headers={"Content-Type": ""})
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # https only, checked above
                logger.info(
                    "answered CloudFormation", extra={"status": body["Status"], "http": answer.status}
                )
                return
        except OSError as exc:  # URLError and HTTPError are OSErrors
            logger.warning("could not answer CloudFormation", extra={"attempt": attempt, "error": str(exc)})
            if attempt == SEND_ATTEMPTS:
                raise
            time.sleep(2**attempt)


def migrate() -> dict:
    """Apply what is pending; the Data of a SUCCESS answer."""
    from embedsvc import container
    from embedsvc.db.migrations import upgrade

    applied = upgrade(container.database())
    logger.info("migrations applied", extra={"applied": applied, "count": len(applied)})
    return {"Applied": len(applied)}


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict, context: LambdaContext) -> None:
    request_type = event.get("RequestType")
    logger.info(
        "custom resource request",
        extra={"request_type": request_type, "logical_resource_id": event.get("LogicalResourceId")},
    )
    try:
        if request_type == "Delete":
            body = build_response(event, context, "SUCCESS", reason="Delete leaves the schema in place")
        elif request_type in ("Create", "Update"):
            body = build_response(event, context, "SUCCESS", migrate())
            # Answer Update with the same id: another would make CloudFormation send a Delete for this one.
            body["PhysicalResourceId"] = PHYSICAL_RESOURCE_ID
        else:
            raise ValueError(f"unknown RequestType {request_type!r}")
    except Exception as exc:  # every failure must reach CloudFormation, or the deploy waits for nothing
        logger.exception("migration failed")
        body = build_response(event, context, "FAILED", reason=f"{type(exc).__name__}: {exc}")
    send_response(event["ResponseURL"], body)

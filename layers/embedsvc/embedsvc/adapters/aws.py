"""boto3 clients and secrets, created on first use and cached per process.

Locally (moto server) the endpoint comes from AWS_ENDPOINT_URL, which botocore reads itself.
"""

from __future__ import annotations

import os
import threading
from functools import cache
from typing import Any

_lock = threading.Lock()


@cache
def client(service: str, *, fast: bool = False) -> Any:
    """A cached boto3 client for `service` in the configured region.

    `fast` clients (the rate-limit ledger, the cache: on every request's path) give up within about two
    seconds, so a hung DynamoDB turns into the ledger's fallback well before API Gateway's 29 s timeout.
    """
    import boto3
    from botocore.config import Config

    # boto3's session creation is not thread-safe; clients themselves are.
    with _lock:
        return boto3.session.Session().client(
            service,
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                retries={"max_attempts": 2 if fast else 3, "mode": "standard"},
                connect_timeout=1 if fast else 60,
                read_timeout=2 if fast else 60,
                max_pool_connections=32,
            ),
        )


def get_secret(secret_id: str, *, max_age_seconds: int = 300) -> str:
    """A secret's string value from Secrets Manager, cached for `max_age_seconds` (Powertools parameters)."""
    from aws_lambda_powertools.utilities import parameters

    value = parameters.get_secret(secret_id, max_age=max_age_seconds, boto3_client=client("secretsmanager"))
    return value if isinstance(value, str) else value.decode()


def get_parameter(name: str, *, max_age_seconds: int = 60) -> str:
    """An SSM parameter's value, cached for `max_age_seconds` so config changes apply without a deploy."""
    from aws_lambda_powertools.utilities import parameters

    return str(parameters.get_parameter(name, max_age=max_age_seconds, ssm_client=client("ssm")))


def reset() -> None:
    client.cache_clear()
    from aws_lambda_powertools.utilities import parameters

    parameters.clear_caches()


def create_table_with_ttl(client: Any, table_name: str, keys: dict[str, str]) -> None:
    """Create an on-demand table with string `keys` ({"pk": "HASH", "sk": "RANGE"}) and TTL on `expires_at`,
    as template.yaml declares it; an existing table is kept (its TTL switched on if it is not)."""
    from botocore.exceptions import ClientError

    try:
        client.create_table(
            TableName=table_name,
            AttributeDefinitions=[{"AttributeName": name, "AttributeType": "S"} for name in keys],
            KeySchema=[{"AttributeName": name, "KeyType": kind} for name, kind in keys.items()],
            BillingMode="PAY_PER_REQUEST",
        )
        client.get_waiter("table_exists").wait(
            TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
            raise
    ttl = client.describe_time_to_live(TableName=table_name).get("TimeToLiveDescription", {})
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        client.update_time_to_live(
            TableName=table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
        )

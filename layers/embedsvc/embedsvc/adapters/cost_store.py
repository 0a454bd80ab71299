"""The cost roll-up: one DynamoDB item per UTC day and dimension value, updated with atomic ADDs.

Items (table CostsTable, key pk + sk):
    pk "2025-06-01#source", sk "user_query"        per day: source, model, tenant, user, task, source#model
    pk "task#<task id>",    sk "total"             a task's lifetime total (what `task_totals` reads)
Attributes: tokens, nano_usd, requests, saved_tokens, saved_nano_usd (integers: ADD never drifts), and for
tasks `sources` and `models` (string sets, ADDed) and first_seen/last_seen (epoch seconds). Every item
expires `ttl_days` after its day (a lifetime item: after it was last written).

Reading one day of one dimension is one Query on its partition, so a report over N days costs
O(N x items), never a scan of raw logs.

Writes are plain UpdateItems (not a transaction: concurrent Lambdas add to the same hot items, and
transactions on one item conflict), sent in parallel, without botocore's retries. ADD is not idempotent,
so a write whose outcome is unknown (a read timeout, a 500) is never repeated: it is dropped and logged
with its amount. A write DynamoDB refused before applying it (throttled, or the connection never opened)
is retried once. The roll-up may then fall short, never count twice; EMF keeps the exact per-source sums.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger

from embedsvc.observability import NANO_PER_USD, RollupDelta, RollupKey

logger = Logger(child=True)

DEFAULT_TTL_DAYS = 400
LIFETIME_SK = "total"
# Refused before anything was applied: safe to send once more.
NOT_APPLIED_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TransactionConflictException",
    }
)
RETRY_DELAY_SECONDS = 0.05


@dataclass
class ItemTotals(RollupDelta):
    """One roll-up item as read back (or a sum of several)."""

    @property
    def usd(self) -> float:
        return self.nano_usd / NANO_PER_USD

    @property
    def saved_usd(self) -> float:
        return self.saved_nano_usd / NANO_PER_USD

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "usd": self.usd,
            "requests": self.requests,
            "saved_tokens": self.saved_tokens,
            "saved_usd": self.saved_usd,
        }


def item_key(key: RollupKey) -> dict[str, dict[str, str]]:
    """The DynamoDB key of a roll-up item."""
    if key.day is None:
        return {"pk": {"S": f"{key.dimension}#{key.value}"}, "sk": {"S": LIFETIME_SK}}
    return {"pk": {"S": f"{key.day}#{key.dimension}"}, "sk": {"S": key.value}}


def _epoch(value: float) -> str:
    return f"{value:.3f}"


def update_request(table: str, key: RollupKey, delta: RollupDelta, ttl_days: int) -> dict[str, Any]:
    """The UpdateItem that adds `delta` to one item (built apart from I/O so tests can read it)."""
    names = {
        "#tokens": "tokens",
        "#nano": "nano_usd",
        "#requests": "requests",
        "#saved": "saved_tokens",
        "#saved_nano": "saved_nano_usd",
        "#expires": "expires_at",
        "#dim": "dimension",
    }
    values: dict[str, Any] = {
        ":tokens": {"N": str(delta.tokens)},
        ":nano": {"N": str(delta.nano_usd)},
        ":requests": {"N": str(delta.requests)},
        ":saved": {"N": str(delta.saved_tokens)},
        ":saved_nano": {"N": str(delta.saved_nano_usd)},
        ":dim": {"S": key.dimension},
    }
    adds = [
        "#tokens :tokens",
        "#nano :nano",
        "#requests :requests",
        "#saved :saved",
        "#saved_nano :saved_nano",
    ]
    sets = ["#expires = :expires", "#dim = :dim"]
    expires: float
    if key.day is not None:
        expires = calendar.timegm(time.strptime(key.day, "%Y-%m-%d")) + ttl_days * 86400
    else:
        expires = (delta.last_seen or time.time()) + ttl_days * 86400
    values[":expires"] = {"N": str(int(expires))}
    if delta.sources:
        names["#sources"] = "sources"
        values[":sources"] = {"SS": sorted(delta.sources)}
        adds.append("#sources :sources")
    if delta.models:
        names["#models"] = "models"
        values[":models"] = {"SS": sorted(delta.models)}
        adds.append("#models :models")
    if delta.first_seen is not None:
        names["#first"] = "first_seen"
        values[":first"] = {"N": _epoch(delta.first_seen)}
        sets.append("#first = if_not_exists(#first, :first)")
    if delta.last_seen is not None:
        # Not a max(): DynamoDB has none. Two processes flushing a task within a second may leave the
        # earlier time, which is still "seen within the last minutes".
        names["#last"] = "last_seen"
        values[":last"] = {"N": _epoch(delta.last_seen)}
        sets.append("#last = :last")
    return {
        "TableName": table,
        "Key": item_key(key),
        "UpdateExpression": f"ADD {', '.join(adds)} SET {', '.join(sets)}",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def _number(item: Mapping[str, Any], name: str) -> int:
    raw = item.get(name, {}).get("N")
    return int(Decimal(raw)) if raw is not None else 0


def parse_item(item: Mapping[str, Any]) -> ItemTotals:
    """An item's totals from its DynamoDB attributes."""
    first = item.get("first_seen", {}).get("N")
    last = item.get("last_seen", {}).get("N")
    return ItemTotals(
        tokens=_number(item, "tokens"),
        nano_usd=_number(item, "nano_usd"),
        requests=_number(item, "requests"),
        saved_tokens=_number(item, "saved_tokens"),
        saved_nano_usd=_number(item, "saved_nano_usd"),
        first_seen=float(first) if first is not None else None,
        last_seen=float(last) if last is not None else None,
        sources=set(item.get("sources", {}).get("SS", [])),
        models=set(item.get("models", {}).get("SS", [])),
    )


def _not_applied(exc: Exception) -> bool:
    """Whether DynamoDB (or the network) refused the write before applying it: then a retry is safe."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError

    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in NOT_APPLIED_CODES
    return isinstance(exc, ConnectTimeoutError | EndpointConnectionError)


class CostStore:
    """The daily cost roll-up in DynamoDB: written by `CostRecorder.flush`, read by `embedsvc costs`."""

    def __init__(
        self,
        table: str,
        dynamodb: Any,
        *,
        ttl_days: int = DEFAULT_TTL_DAYS,
        parallel: int = 8,
        sleep=time.sleep,
    ):
        self.table = table
        self.dynamodb = dynamodb
        self.ttl_days = ttl_days
        self.parallel = parallel
        self.sleep = sleep
        self._pool: ThreadPoolExecutor | None = None

    def apply(self, deltas: Mapping[RollupKey, RollupDelta]) -> list[RollupKey]:
        """ADD every delta to its item; returns the keys not written (see the module's note). Never raises."""
        if not deltas:
            return []
        keys = list(deltas)
        if len(keys) == 1 or self.parallel <= 1:
            results = [self._apply_one(key, deltas[key]) for key in keys]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="cost-rollup")
            results = list(self._pool.map(lambda key: self._apply_one(key, deltas[key]), keys))
        return [key for key, ok in zip(keys, results, strict=True) if not ok]

    def _apply_one(self, key: RollupKey, delta: RollupDelta) -> bool:
        request = update_request(self.table, key, delta, self.ttl_days)
        for attempt in (1, 2):
            try:
                self.dynamodb.update_item(**request)
                return True
            except Exception as exc:
                if attempt == 1 and _not_applied(exc):
                    self.sleep(RETRY_DELAY_SECONDS)
                    continue
                logger.warning(
                    "cost roll-up write dropped",
                    extra={"dimension": key.dimension, "day": key.day, "error": _error_name(exc)},
                )
                return False
        return False

    def day_items(self, day: str, dimension: str) -> dict[str, ItemTotals]:
        """Every value of `dimension` on `day` with its totals: one Query (paged) on the day's partition."""
        found: dict[str, ItemTotals] = {}
        for item in self._query(f"{day}#{dimension}"):
            found[item["sk"]["S"]] = parse_item(item)
        return found

    def totals(self, days: Iterable[str], dimension: str) -> dict[str, ItemTotals]:
        """The values of `dimension` summed over `days`."""
        summed: dict[str, ItemTotals] = {}
        for day in days:
            for value, item in self.day_items(day, dimension).items():
                summed.setdefault(value, ItemTotals()).add(item)
        return summed

    def task(self, task_id: str) -> ItemTotals | None:
        """A task's lifetime totals (with its sources and first/last seen), or None if it never spent."""
        # A Query on its one-item partition, not a GetItem: readers need dynamodb:Query only.
        pk = item_key(RollupKey(None, "task", task_id))["pk"]["S"]
        items = list(self._query(pk, consistent=True))
        return parse_item(items[0]) if items else None

    def task_totals(self, task_id: str) -> dict[str, Any]:
        """What a task (a backfill, an import) has spent so far: {"tokens", "usd", "requests"}."""
        found = self.task(task_id) or ItemTotals()
        return {"tokens": found.tokens, "usd": found.usd, "requests": found.requests}

    def _query(self, pk: str, *, consistent: bool = False) -> Iterator[dict[str, Any]]:
        request: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": pk}},
            "ConsistentRead": consistent,
        }
        while True:
            answer = self.dynamodb.query(**request)
            yield from answer.get("Items", [])
            if "LastEvaluatedKey" not in answer:
                return
            request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    def export_items(self, path: Path | str) -> int:
        """Write every item to a JSON-lines file (DynamoDB's typed JSON); the local stack's persistence."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        request: dict[str, Any] = {"TableName": self.table}
        with out.open("w") as fh:
            while True:
                answer = self.dynamodb.scan(**request)
                for item in answer.get("Items", []):
                    fh.write(json.dumps(item, sort_keys=True) + "\n")
                    count += 1
                if "LastEvaluatedKey" not in answer:
                    return count
                request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    def import_items(self, path: Path | str) -> int:
        """Put the items of an `export_items` file back (into a fresh table); returns how many."""
        items = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        for start in range(0, len(items), 25):  # BatchWriteItem takes 25
            pending: dict[str, Any] = {
                self.table: [{"PutRequest": {"Item": item}} for item in items[start : start + 25]]
            }
            for attempt in range(8):
                answer = self.dynamodb.batch_write_item(RequestItems=pending)
                pending = answer.get("UnprocessedItems") or {}
                if not pending:
                    break
                time.sleep(min(0.05 * 2**attempt, 1.0))
            if pending:
                raise RuntimeError(f"could not restore {sum(map(len, pending.values()))} cost items")
        return len(items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _error_name(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "ClientError")
    return type(exc).__name__


def rollup_client() -> Any:
    """A DynamoDB client for roll-up writes: no automatic retries (an ADD must not be repeated blindly), and
    short timeouts (a flush sits at the end of an API request)."""
    import os

    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "dynamodb",
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=1,
            read_timeout=2,
            max_pool_connections=16,
        ),
    )


def create_costs_table(client: Any, table_name: str) -> None:
    """Create the roll-up table (pk + sk, TTL on `expires_at`) unless it exists, as template.yaml does."""
    from embedsvc.adapters.aws import create_table_with_ttl

    create_table_with_ttl(client, table_name, {"pk": "HASH", "sk": "RANGE"})


__all__ = ["CostStore", "ItemTotals", "create_costs_table", "rollup_client"]

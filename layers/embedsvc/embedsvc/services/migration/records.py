"""Where a migration keeps its state: one lock per content type and one record per migration.

Both live in the state table (partition key `pk`): `migration-lock#{content_type}` holds the owner (the
execution's ARN) and an expiry, taken with a conditional put, so two executions can never both migrate
a content type; `migration#{id}` is the record an operator reads (`embedsvc migrate status`) and a
restarted execution resumes from (phase, backfill cursor, gate result); `migration-latest#{content_type}`
names the content type's latest record.

Step Functions may run a step twice: every write here is a plain overwrite of the fields it sets, so
doing it again changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from embedsvc.errors import EmbedServiceError

# Lock leases outlive the longest gap between two steps (a rollback-window poll), plus slack.
MIN_LOCK_LEASE_SECONDS = 15 * 60


class MigrationInProgress(EmbedServiceError):
    """Another execution holds the content type's migration lock."""

    status = 409
    type = "invalid_request_error"
    code = "migration_in_progress"


class MigrationNotFound(EmbedServiceError):
    status = 404
    type = "invalid_request_error"
    code = "migration_not_found"


def _plain(value: Any) -> Any:
    """DynamoDB's Decimals back to ints and floats (records are JSON to every reader)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class MigrationRecords:
    """The lock and the records, on the state table (boto3's client, items typed by its serializer)."""

    def __init__(self, table_name: str, dynamodb_client: Any, *, clock: Callable[[], float] = time.time):
        import boto3.dynamodb.types as types

        self.table_name = table_name
        self.client = dynamodb_client
        self.clock = clock
        self._serializer = types.TypeSerializer()
        self._deserializer = types.TypeDeserializer()

    # --- items ---------------------------------------------------------------------------------------

    def _to_item(self, data: dict[str, Any]) -> dict[str, Any]:
        # Floats go through JSON text to Decimal: boto3 refuses Python floats.
        clean = json.loads(json.dumps(data), parse_float=Decimal)
        return {k: self._serializer.serialize(v) for k, v in clean.items() if v is not None}

    def _from_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return _plain({k: self._deserializer.deserialize(v) for k, v in item.items()})

    def _get(self, pk: str) -> dict[str, Any] | None:
        answer = self.client.get_item(TableName=self.table_name, Key={"pk": {"S": pk}}, ConsistentRead=True)
        item = answer.get("Item")
        return self._from_item(item) if item else None

    # --- the lock ------------------------------------------------------------------------------------

    def lock_holder(self, content_type: str) -> dict[str, Any] | None:
        """The current lock item (owner, migration_id, expires_at), or None; expired locks included."""
        return self._get(f"migration-lock#{content_type}")

    def acquire(
        self,
        content_type: str,
        owner: str,
        migration_id: str,
        lease_seconds: float,
        *,
        stale_owner: str | None = None,
    ) -> None:
        """Take (or renew) the lock; MigrationInProgress when another live owner holds it.

        `stale_owner`: an owner the caller has found dead (its execution is no longer running): its lock
        is taken over even before it expires.
        """
        now = self.clock()
        lease = max(lease_seconds, MIN_LOCK_LEASE_SECONDS)
        condition = "attribute_not_exists(pk) OR #owner = :owner OR expires_at < :now"
        values: dict[str, Any] = {":owner": {"S": owner}, ":now": {"N": str(int(now))}}
        if stale_owner is not None:
            condition += " OR #owner = :stale"
            values[":stale"] = {"S": stale_owner}
        item = self._to_item(
            {
                "pk": f"migration-lock#{content_type}",
                "owner": owner,
                "migration_id": migration_id,
                "acquired_at": now,
                "expires_at": int(now + lease),
            }
        )
        try:
            self.client.put_item(
                TableName=self.table_name,
                Item=item,
                ConditionExpression=condition,
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues=values,
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            holder = self.lock_holder(content_type) or {}
            raise MigrationInProgress(
                f"a migration of {content_type} is already running: {holder.get('migration_id')} "
                f"(execution {holder.get('owner')}); wait for it, or roll it back"
            ) from None

    def release(self, content_type: str, owner: str) -> None:
        """Drop the lock if `owner` holds it (a second release, or someone else's lock, is left alone)."""
        with contextlib.suppress(self.client.exceptions.ConditionalCheckFailedException):
            self.client.delete_item(
                TableName=self.table_name,
                Key={"pk": {"S": f"migration-lock#{content_type}"}},
                ConditionExpression="#owner = :owner",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={":owner": {"S": owner}},
            )

    # --- the records ---------------------------------------------------------------------------------

    def get(self, migration_id: str) -> dict[str, Any]:
        record = self._get(f"migration#{migration_id}")
        if record is None:
            raise MigrationNotFound(f"no migration {migration_id}")
        return record

    def latest(self, content_type: str) -> dict[str, Any] | None:
        """The content type's latest migration record, or None when it was never migrated."""
        pointer = self._get(f"migration-latest#{content_type}")
        if pointer is None:
            return None
        return self._get(f"migration#{pointer['migration_id']}")

    def create(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "updated_at": self.clock()}
        self.client.put_item(
            TableName=self.table_name,
            Item=self._to_item({"pk": f"migration#{record['migration_id']}", **record}),
        )
        self.client.put_item(
            TableName=self.table_name,
            Item=self._to_item(
                {"pk": f"migration-latest#{record['content_type']}", "migration_id": record["migration_id"]}
            ),
        )
        return record

    def update(self, migration_id: str, **fields: Any) -> None:
        """Set these fields of the record (None removes one)."""
        fields["updated_at"] = self.clock()
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        sets: list[str] = []
        removes: list[str] = []
        for i, (key, value) in enumerate(fields.items()):
            names[f"#f{i}"] = key
            if value is None:
                removes.append(f"#f{i}")
            else:
                values[f":v{i}"] = self._to_item({"v": value})["v"]
                sets.append(f"#f{i} = :v{i}")
        expression = ("SET " + ", ".join(sets) if sets else "") + (
            " REMOVE " + ", ".join(removes) if removes else ""
        )
        # `updated_at` is always set, so there is always a value.
        self.client.update_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"migration#{migration_id}"}},
            UpdateExpression=expression.strip(),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ConditionExpression="attribute_exists(pk)",
        )

    def claim(self, migration_id: str, field: str, *, unless: str) -> bool:
        """Set `field` to true unless `unless` is set, in one conditional write; whether it was set (or
        already was). Two racing decisions (cleanup vs rollback) can then never both win."""
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": f"migration#{migration_id}"}},
                UpdateExpression="SET #f = :true, updated_at = :now",
                ConditionExpression="attribute_exists(pk) AND attribute_not_exists(#u)",
                ExpressionAttributeNames={"#f": field, "#u": unless},
                ExpressionAttributeValues={":true": {"BOOL": True}, ":now": {"N": str(self.clock())}},
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def append_phase(self, migration_id: str, phase: str) -> None:
        """Record that the migration entered `phase` (once: a step run twice does not repeat it)."""
        record = self.get(migration_id)
        phases = list(record.get("phases") or [])
        if not phases or phases[-1] != phase:
            phases.append(phase)
        self.update(migration_id, phase=phase, phases=phases)

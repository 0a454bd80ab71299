"""Make moto's DynamoDB item operations atomic, as DynamoDB's are.

moto evaluates a ConditionExpression and applies the update in separate Python steps with no lock, so
two server threads can both pass the same check, and concurrent ADDs lose updates (16 threads x 100
ADDs of 1 end near 1,400). Real DynamoDB serializes writes to an item; the rate-limit ledger's safety
rests on that, so every local use of moto under concurrency (the local stack, tests, benchmarks) runs
with this on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_OPERATIONS = ("get_item", "put_item", "update_item", "delete_item", "transact_write_items")
_lock = threading.RLock()


def serialize_dynamodb_items() -> Callable[[], None]:
    """Serialize moto's DynamoDB item operations in this process; returns a function that undoes it."""
    from moto.dynamodb.models import DynamoDBBackend

    originals = {name: getattr(DynamoDBBackend, name) for name in _OPERATIONS}
    if getattr(originals["update_item"], "_serialized", False):
        return lambda: None  # already on (nested use): the outer caller undoes it

    def locked(original):
        def call(self, *args, **kwargs):
            with _lock:
                return original(self, *args, **kwargs)

        call._serialized = True  # type: ignore[attr-defined]
        return call

    for name, original in originals.items():
        setattr(DynamoDBBackend, name, locked(original))

    def undo() -> None:
        for name, original in originals.items():
            setattr(DynamoDBBackend, name, original)

    return undo

"""Make moto's DynamoDB requests atomic, as DynamoDB's item operations are.

moto evaluates a ConditionExpression and applies the update in separate Python steps with no lock, so
two server threads can both pass the same check, concurrent ADDs lose updates (16 threads x 100 ADDs
of 1 end near 1,400), and an item can change while another request is turning it into its answer
("dictionary changed size during iteration"). Real DynamoDB serializes writes to an item; the
rate-limit ledger's safety rests on that, so every local use of moto under concurrency (the local
stack, tests, benchmarks) runs with this on: one DynamoDB request at a time, answer included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.RLock()


def serialize_dynamodb_items() -> Callable[[], None]:
    """Serialize moto's DynamoDB request handling in this process; returns a function that undoes it."""
    from moto.dynamodb.responses import DynamoHandler

    original = DynamoHandler.call_action
    if getattr(original, "_serialized", False):
        return lambda: None  # already on (nested use): the outer caller undoes it

    def call_action(self):
        with _lock:
            return original(self)

    call_action._serialized = True  # type: ignore[attr-defined]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]

    def undo() -> None:
        DynamoHandler.call_action = original  # type: ignore[method-assign]

    return undo

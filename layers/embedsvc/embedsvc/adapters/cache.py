"""The embedding cache: an in-process LRU in front of a DynamoDB table keyed by (model, dims, sha256(text)).

The cache only saves money and time, so its failures are logged and ignored, never raised:
a request whose cache read fails is simply embedded. For the same reason DynamoDB writes are
write-behind, on one background thread, off the response's critical path (256 vectors are eleven
BatchWriteItem calls): a write lost with a frozen or recycled Lambda container costs one future miss.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
from aws_lambda_powertools import Logger

logger = Logger(child=True)

BATCH_GET_LIMIT = 100  # DynamoDB BatchGetItem keys per call
BATCH_WRITE_LIMIT = 25  # DynamoDB BatchWriteItem items per call


def cache_key(model_key: str, dimensions: int, text: str, tenant_id: str | None = None) -> str:
    """The cache's key for one text; the text itself is never stored.

    Keys are scoped by tenant: a shared cache would let any tenant learn (from speed, or X-Cache-Hits)
    whether another tenant had embedded an exact text, such as a private note.
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"{model_key}#{dimensions}#{tenant_id or '-'}#{digest}"


class EmbeddingCache:
    """Two tiers: a bounded per-process LRU (warm Lambdas keep it) and the shared DynamoDB table."""

    def __init__(
        self,
        table_name: str,
        client,
        *,
        ttl_seconds: int,
        memory_items: int = 20_000,
        clock=time.time,
        write_behind: bool = True,
    ):
        self.table_name = table_name
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_items = memory_items
        self._lock = threading.Lock()
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") if write_behind else None
        )
        self._pending: set[Future] = set()

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._memory[key] = vector
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors found for `keys` (missing keys are absent from the answer)."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for key in keys:
                vector = self._memory.get(key)
                if vector is not None:
                    self._memory.move_to_end(key)
                    found[key] = vector
        remote = [k for k in dict.fromkeys(keys) if k not in found]
        if not remote or self.client is None:
            return found
        now = int(self.clock())
        try:
            for start in range(0, len(remote), BATCH_GET_LIMIT):
                request = {
                    self.table_name: {
                        "Keys": [{"pk": {"S": k}} for k in remote[start : start + BATCH_GET_LIMIT]]
                    }
                }
                for _ in range(5):  # unprocessed keys come back under load: retry a few times, then miss
                    answer = self.client.batch_get_item(RequestItems=request)
                    for item in answer.get("Responses", {}).get(self.table_name, []):
                        if int(item.get("expires_at", {}).get("N", "0")) < now:
                            continue  # TTL deletion is lazy: an expired item is a miss
                        vector = np.frombuffer(item["v"]["B"], dtype=np.float32)
                        found[item["pk"]["S"]] = vector
                        self._remember(item["pk"]["S"], vector)
                    request = answer.get("UnprocessedKeys") or {}
                    if not request:
                        break
        except Exception as exc:
            logger.warning("embedding cache read failed; embedding instead", extra={"error": repr(exc)})
        return found

    def put_many(self, entries: dict[str, np.ndarray]) -> None:
        """Store vectors (float32) with a TTL: in memory now, in DynamoDB behind the response."""
        for key, vector in entries.items():
            self._remember(key, vector)
        if not entries or self.client is None:
            return
        if self._writer is None:
            self._write(entries)
            return
        future = self._writer.submit(self._write, dict(entries))
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait for write-behind writes (tests, the worker before acknowledging, process shutdown)."""
        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=timeout)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def _write(self, entries: dict[str, np.ndarray]) -> None:
        expires = str(int(self.clock()) + self.ttl_seconds)
        items = [
            {
                "PutRequest": {
                    "Item": {
                        "pk": {"S": key},
                        "v": {"B": np.asarray(vector, dtype=np.float32).tobytes()},
                        "expires_at": {"N": expires},
                    }
                }
            }
            for key, vector in entries.items()
        ]
        try:
            for start in range(0, len(items), BATCH_WRITE_LIMIT):
                request = {self.table_name: items[start : start + BATCH_WRITE_LIMIT]}
                for _ in range(5):
                    answer = self.client.batch_write_item(RequestItems=request)
                    request = answer.get("UnprocessedItems") or {}
                    if not request:
                        break
        except Exception as exc:
            logger.warning("embedding cache write failed", extra={"error": repr(exc)})

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


def create_cache_table(client, table_name: str) -> None:
    """Create the cache table as template.yaml does (local stack, tests); no-op if it exists."""
    try:
        client.create_table(
            TableName=table_name,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    except client.exceptions.ResourceInUseException:
        return
    client.update_time_to_live(
        TableName=table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
    )

"""The embedding cache: an in-process LRU in front of a DynamoDB table keyed by (model, dims, sha256(text)).

The cache only saves money and time, so its failures are logged and ignored, never raised:
a request whose cache read fails is simply embedded. DynamoDB writes start on background threads as
soon as each provider chunk lands (256 te3s vectors are eleven BatchWriteItem calls, sent in
parallel) and overlap the answer's serialization; the API waits for them (`flush`) before it answers,
since a Lambda process is frozen once it has answered and a write left pending would only run, or be
lost, at its next invocation.
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
        writers: int = 4,
    ):
        self.table_name = table_name
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_items = memory_items
        self._lock = threading.Lock()
        self._writer = (
            ThreadPoolExecutor(max_workers=writers, thread_name_prefix="cache-writer")
            if write_behind
            else None
        )
        self._pending: set[Future] = set()
        self._reader_pool: ThreadPoolExecutor | None = None

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._memory[key] = vector
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)

    def get_many(self, keys: Sequence[str], *, shared: bool = True) -> dict[str, np.ndarray]:
        """Vectors found for `keys` in memory, and unless `shared` is off in DynamoDB (missing keys are absent)."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for key in keys:
                vector = self._memory.get(key)
                if vector is not None:
                    self._memory.move_to_end(key)
                    found[key] = vector
        remote = [k for k in dict.fromkeys(keys) if k not in found]
        if not remote or self.client is None or not shared:
            return found
        chunks = [remote[start : start + BATCH_GET_LIMIT] for start in range(0, len(remote), BATCH_GET_LIMIT)]
        if len(chunks) == 1:
            results = [self._read(chunks[0])]
        else:  # BatchGetItem takes 100 keys: ask for the chunks at once, not one after the other
            results = list(self._readers().map(self._read, chunks))
        for chunk_found in results:
            found.update(chunk_found)
            for key, vector in chunk_found.items():
                self._remember(key, vector)
        return found

    def _readers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._reader_pool is None:
                self._reader_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cache-reader")
            return self._reader_pool

    def _read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """One BatchGetItem (with its unprocessed keys retried a few times); failures are misses."""
        found: dict[str, np.ndarray] = {}
        now = int(self.clock())
        request: dict = {self.table_name: {"Keys": [{"pk": {"S": k}} for k in keys]}}
        try:
            for _ in range(5):  # unprocessed keys come back under load: retry a few times, then miss
                answer = self.client.batch_get_item(RequestItems=request)
                for item in answer.get("Responses", {}).get(self.table_name, []):
                    if int(item.get("expires_at", {}).get("N", "0")) < now:
                        continue  # TTL deletion is lazy: an expired item is a miss
                    found[item["pk"]["S"]] = np.frombuffer(item["v"]["B"], dtype=np.float32)
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    break
        except Exception as exc:
            logger.warning("embedding cache read failed; embedding instead", extra={"error": repr(exc)})
        return found

    def put_many(self, entries: dict[str, np.ndarray], *, shared: bool = True) -> None:
        """Store vectors (float32): in memory now, and unless `shared` is off in DynamoDB with a TTL."""
        for key, vector in entries.items():
            self._remember(key, vector)
        if not entries or self.client is None or not shared:
            return
        if self._writer is None:
            self._write(entries)
            return
        items = list(entries.items())
        for start in range(0, len(items), BATCH_WRITE_LIMIT):  # one BatchWriteItem per task, in parallel
            future = self._writer.submit(self._write, dict(items[start : start + BATCH_WRITE_LIMIT]))
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait for pending writes (the API before it answers, tests, process shutdown)."""
        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=timeout)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._reader_pool is not None:
            self._reader_pool.shutdown(wait=True)

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

"""The backfill: every live row of a content type, queued for the new model's collection.

It pages the content store in point-id order and sends one by-id index request per row to IndexQueue
at bulk priority (users' requests keep the realtime lane ahead of it), source `reindex`, the migration
as `task_id` (its cost is read back by that id). The worker loads each row as it is when the message
is processed and writes it with a version-conditional upsert, so a backfilled point never overwrites a
fresher dual-written one, and a row deleted meanwhile is written as a tombstone, not revived.

Progress (the last point id queued, and counts) is saved after every page in the migration record: a
step that runs out of time returns `done: false` and the workflow calls it again; a restarted execution
resumes from the cursor instead of starting over. A page is sent before its cursor is saved, so a crash
in between re-sends at most one page (the worker's conditional writes make that harmless).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedsvc.errors import TransientError
from embedsvc.models.messages import IndexMessage

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.adapters.index_queue import IndexQueue
    from embedsvc.services.migration.records import MigrationRecords

BACKFILL_SOURCE = "reindex"
DEFAULT_PAGE = 500


@dataclass
class BackfillProgress:
    done: bool
    queued: int  # rows queued so far, over every run of the step
    total: int  # live rows of the content type when this run started
    cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"done": self.done, "queued": self.queued, "total": self.total, "cursor": self.cursor}


class Backfill:
    def __init__(
        self,
        store: ContentStore,
        queue: IndexQueue,
        records: MigrationRecords,
        *,
        page: int = DEFAULT_PAGE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.queue = queue
        self.records = records
        self.page = page
        self.clock = clock

    def run(
        self,
        migration_id: str,
        content_type: str,
        target_model: str,
        *,
        seconds: float,
    ) -> BackfillProgress:
        """Queue pages until every row is queued or `seconds` have passed; resumes from the record."""
        started = self.clock()
        record = self.records.get(migration_id)
        state = dict(record.get("backfill") or {})
        if state.get("done"):
            return BackfillProgress(
                True, int(state.get("queued", 0)), int(state.get("total", 0)), state.get("cursor")
            )
        cursor: str | None = state.get("cursor")
        queued = int(state.get("queued", 0))
        total = self.store.count(content_type)
        batch: list[IndexMessage] = []
        last: str | None = cursor
        for row in self.store.iter_point_states(content_type, page=self.page, after=cursor):
            last = row.point_id
            if not row.deleted:  # deleted rows have nothing to embed; the audit sees no gap for them
                fields: dict[str, Any] = {
                    "content_type": content_type,
                    "id": row.id,
                    "owner_id": row.owner_id,
                    "source": BACKFILL_SOURCE,
                    "task_id": migration_id,
                    "priority": "bulk",
                    "models": [target_model],
                }
                batch.append(IndexMessage.model_validate(fields))
            if len(batch) >= self.page:
                queued = self._send(migration_id, batch, last, queued, total)
                batch = []
                if self.clock() - started >= seconds:
                    return BackfillProgress(False, queued, total, last)
        queued = self._send(migration_id, batch, last, queued, total, done=True)
        return BackfillProgress(True, queued, total, last)

    def _send(
        self,
        migration_id: str,
        batch: list[IndexMessage],
        cursor: str | None,
        queued: int,
        total: int,
        *,
        done: bool = False,
    ) -> int:
        unsent = self.queue.send(batch)
        if unsent:
            # The cursor stays before this page: the retried step sends it again.
            raise TransientError(f"IndexQueue refused {len(unsent)} of {len(batch)} backfill messages")
        queued += len(batch)
        self.records.update(
            migration_id, backfill={"cursor": cursor, "queued": queued, "total": total, "done": done}
        )
        return queued

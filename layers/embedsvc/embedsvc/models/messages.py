"""The IndexQueue message schema (versioned). Producers: see README, "Queue messages"."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from embedsvc.models.names import CONTENT_TYPE_PATTERN, MAX_TAG_LENGTH

CURRENT_SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

Name = Annotated[str, StringConstraints(pattern=CONTENT_TYPE_PATTERN)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_LENGTH)]


class IndexMessageV1(BaseModel):
    """Ask for one piece of content to be (re)embedded into its collections, or removed from them."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    content_type: Name  # e.g. "verse", "note"; collections are `{content_type}_{model_key}`
    id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    text: str | None = None  # absent: loaded from the content store
    owner_id: Tag | None = None  # tenant that owns the content; None for shared content (verses)
    metadata: dict[str, Any] = Field(default_factory=dict)
    source: Name = "reindex"  # cost center: note_index, verse_index, reindex, backfill, ...
    task_id: Tag | None = None
    # The request or run that produced this message (API request id, X-Correlation-Id, a repair run):
    # the worker logs the message under it. IndexQueue.send fills it in from the producer's context.
    correlation_id: Tag | None = None
    priority: Literal["realtime", "bulk"] = "bulk"
    models: list[str] | None = (
        None  # target model keys; None -> the content type's active (and shadow) models
    )
    # The content's version: newer wins. Absent -> the message's SQS SentTimestamp (never the time a worker
    # happens to parse it, which would let a redelivered old message beat a newer one).
    updated_at: datetime | None = None
    delete: bool = False

    def updated_at_epoch_ms(self) -> int:
        if self.updated_at is None:
            raise ValueError("message has no updated_at")
        at = self.updated_at if self.updated_at.tzinfo else self.updated_at.replace(tzinfo=UTC)
        return int(at.timestamp() * 1000)


IndexMessage = IndexMessageV1

"""The Qdrant point a content row becomes: one shape for the write-through API, the worker and repair."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentRow


def live_payload(row: ContentRow, model_key: str, indexed_at_ms: int) -> dict[str, Any]:
    """Payload of a live row's point. `version` is Postgres's: conditional writes compare it."""
    return {
        "id": row.id,
        "content_type": row.content_type,
        "owner_id": row.owner_id,
        "content_hash": row.content_hash,
        "model": model_key,
        "version": row.version,
        "updated_at": int(row.updated_at.timestamp() * 1000),
        "indexed_at": indexed_at_ms,
        "metadata": row.metadata,
        "deleted": False,
    }


def tombstone_payload(row: ContentRow, model_key: str, indexed_at_ms: int) -> dict[str, Any]:
    """A deleted row's point: no text, no metadata, only the version that keeps older writes out."""
    return {
        "id": row.id,
        "content_type": row.content_type,
        "owner_id": row.owner_id,
        "content_hash": None,
        "model": model_key,
        "version": row.version,
        "updated_at": int(row.updated_at.timestamp() * 1000),
        "indexed_at": indexed_at_ms,
        "deleted": True,
    }


def tombstone_vector(dimensions: int) -> list[float]:
    """Any valid vector: a tombstone is never searched (search filters `deleted`), only compared by version."""
    return [1.0] + [0.0] * (dimensions - 1)


def index_status(row: ContentRow, payload: dict[str, Any] | None) -> str:
    """How a collection's point compares with the row: indexed, stale, missing, deleted or pending_delete."""
    if row.deleted:
        return "deleted" if payload is None or payload.get("deleted") else "pending_delete"
    if payload is None or payload.get("deleted"):
        return "missing"
    if payload.get("content_hash") != row.content_hash or int(payload.get("version") or 0) < row.version:
        return "stale"
    return "indexed"

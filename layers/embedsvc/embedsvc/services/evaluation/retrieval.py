"""How an evaluation reaches the service: the cost source it pays as, and searches as (doc id, score) lists.

Everything an evaluation embeds (corpus documents and queries) is paid for as source `evaluation`, and
its queries go on the bulk lane: scheduled and gate runs must not mark users active and squeeze bulk work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedsvc.services.search import SearchService

SOURCE = "evaluation"


def evaluation_search(
    model_key: str,
    collection: str,
    query_texts: list[str],
    limit: int,
    *,
    task_id: str | None = None,
    service: SearchService | None = None,
) -> list[list[tuple[str, float]]]:
    """Search the collection as users search (through the search service), paid for as the evaluation."""
    from embedsvc import container
    from embedsvc.observability import CallContext
    from embedsvc.services.ratelimit import Lane

    service = service if service is not None else container.search_service()
    hits = service.search(
        model_key,
        collection,
        query_texts,
        limit,
        context=CallContext(source=SOURCE, task_id=task_id),
        lane=Lane.BULK,
    )
    return [[(hit.id, hit.score) for hit in ranked] for ranked in hits]

"""`/v1/search`: one content type's nearest documents for a query, as the content store says they are now.

The vectors come from the same SearchService the evaluation measures; this adds what a user's search
needs on top: the owner filter of private types (never an unfiltered search of every tenant), the
content store's view of each hit (a document deleted while its tombstone write failed is not
returned, even before the repair job fixes the index), and text and metadata read in one query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from embedsvc.adapters.content_store import content_point_id
from embedsvc.errors import InvalidRequest
from embedsvc.services.model_config import ModelConfig
from embedsvc.services.ratelimit import Lane
from embedsvc.services.search import CollectionNotFound

if TYPE_CHECKING:
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.config import Settings
    from embedsvc.observability import CallContext
    from embedsvc.services.search import SearchService


class DocumentSearch:
    def __init__(
        self,
        settings: Settings,
        store: ContentStore,
        searches: SearchService,
        model_config: ModelConfig | None = None,
    ):
        self.settings = settings
        self.model_config = model_config or ModelConfig(settings)
        self.store = store
        self.searches = searches

    def search(
        self,
        content_type: str,
        query: str,
        top_k: int,
        *,
        context: CallContext,
        filters: Mapping[str, Any] | None = None,
        include: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The answer body of `/v1/search`: hits best first, with the fields asked for."""
        owner_id = None
        if self.store.is_private(content_type):  # an unknown content type is a 404 here, before any embedding
            if not context.tenant_id:
                raise InvalidRequest(f"{content_type} is private: the API key must belong to a tenant")
            owner_id = context.tenant_id  # never None for a private type: that would search every tenant
        try:
            target = self.searches.resolve(content_type)
        except CollectionNotFound:  # nothing of this type was ever indexed: no hits, no query to pay for
            model_key = self.model_config.get(content_type).active
            return self._body(content_type, model_key, f"{content_type}_{model_key}", [])
        (hits,) = self.searches.search(
            target.model_key,
            target.collection,
            [query],
            top_k,
            context=context,
            lane=Lane.REALTIME,
            owner_id=owner_id,
            filters=dict(filters) if filters else None,
        )
        # The content store is the truth: one query for every hit, which also brings text and metadata.
        point_ids = [content_point_id(content_type, hit.id, hit.payload.get("owner_id")) for hit in hits]
        live = self.store.texts(content_type, point_ids)
        data = [
            {"id": hit.id, "score": hit.score, **_included(include, *live[pid])}
            for hit, pid in zip(hits, point_ids, strict=True)
            if pid in live
        ]
        return self._body(content_type, target.model_key, target.resolved, data)

    def _body(self, content_type: str, model_key: str, collection: str, data: list[dict]) -> dict[str, Any]:
        return {
            "object": "list",
            "content_type": content_type,
            "model": self.settings.registry.models[model_key].name,
            "collection": collection,
            "data": data,
        }


def _included(include: Sequence[str], text: str, metadata: dict) -> dict:
    return {name: value for name, value in (("text", text), ("metadata", metadata)) if name in include}

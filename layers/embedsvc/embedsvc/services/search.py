"""Search: embed query texts with the embedding service and find their nearest content in Qdrant.

One service for every caller, so that a user's search and an evaluation's measure the same thing:
`/v1/search` (cost source `user_query`, realtime lane, filtered by owner) and the evaluation (source
`evaluation`, bulk lane). The caller says who pays and on which lane; the service never guesses.

`resolve` turns a content type, and optionally a model or a collection, into what to search: the
content type's alias `{content_type}` or a collection `{content_type}_{model_key}`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedsvc.errors import InvalidRequest, VectorStoreUnavailable
from embedsvc.services.model_config import ModelConfig
from embedsvc.services.ratelimit import Lane

if TYPE_CHECKING:
    from embedsvc.adapters.qdrant import FilterValue, Hit, VectorStore
    from embedsvc.config import Settings
    from embedsvc.observability import CallContext
    from embedsvc.services.embedding import EmbeddingService


class CollectionNotFound(InvalidRequest):
    """The collection (or alias) to search does not exist."""

    status = 404
    code = "collection_not_found"


class InvalidSearchTarget(InvalidRequest):
    """A content type, model and collection that do not name one searchable collection together."""

    code = "invalid_search_target"


@dataclass(frozen=True)
class SearchTarget:
    """What `resolve` found to search for a content type."""

    model_key: str  # the model whose vectors the collection holds
    collection: str  # the name to search: the content type's alias or `{content_type}_{model_key}`
    resolved: str  # the collection behind it (the alias's target, or the collection itself)


class SearchService:
    """Query texts in, nearest content out, through the embedding service and the vector store."""

    def __init__(
        self,
        embeddings: EmbeddingService,
        vectors: VectorStore,
        settings: Settings,
        model_config: ModelConfig | None = None,
    ):
        self.embeddings = embeddings
        self.vectors = vectors
        self.settings = settings
        self.model_config = model_config or ModelConfig(settings)

    def alias_target(self, alias: str) -> str | None:
        """The collection an alias points at, or None when there is no such alias."""
        return self.vectors.alias_target(alias)

    def search(
        self,
        model_key: str,
        collection: str,
        query_texts: Sequence[str],
        limit: int,
        *,
        context: CallContext,
        lane: Lane = Lane.REALTIME,
        owner_id: str | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        truncate: bool = True,
    ) -> list[list[Hit]]:
        """Each query's nearest `limit` hits in a collection or alias, best first.

        The queries are embedded through the cache and paid for by `context` on `lane`; with
        `owner_id`, only that tenant's content and shared content is found; with `filters`, only hits
        whose metadata has those values (see `VectorStore.search`). Over-long queries are
        truncated to the model's window unless `truncate` is False.
        """
        if not query_texts:
            return []
        if not self.vectors.exists(collection) and self.alias_target(collection) is None:
            raise CollectionNotFound(f"collection or alias '{collection}' does not exist", param="collection")
        result = self.embeddings.embed(
            list(query_texts), model_key, context=context, lane=lane, truncate=truncate
        )
        return [
            self.vectors.search(collection, vector, limit=limit, owner_id=owner_id, filters=filters)
            for vector in result.vectors
        ]

    def resolve(
        self, content_type: str, model: str | None = None, collection: str | None = None
    ) -> SearchTarget:
        """What to search for a content type: `collection` if given, else `{content_type}_{model}`
        when a model is given, else the alias `{content_type}` (its model: the one that made the
        collection it points at), else the collection of the content type's active model.

        A named collection must belong to the content type, so that whatever is recorded about the
        search (runs, baselines, metrics) speaks of the same content type.
        """
        settings = self.settings
        model_key = settings.registry.model(model).key if model else None
        if (
            collection is not None
            and collection != content_type
            and not collection.startswith(f"{content_type}_")
        ):
            raise InvalidSearchTarget(
                f"collection '{collection}' does not belong to content type '{content_type}': name its alias "
                f"'{content_type}' or a collection '{content_type}_<model>'",
                param="collection",
            )
        if collection is None:
            if model_key is not None:
                collection = f"{content_type}_{model_key}"
            elif self.alias_target(content_type) is not None:
                collection = content_type
            else:
                collection = f"{content_type}_{self.model_config.get(content_type).active}"
        target = self.alias_target(collection) or collection
        if not self.vectors.exists(target):
            raise CollectionNotFound(
                f"collection '{collection}' for content type '{content_type}' does not exist",
                param="collection",
            )
        prefix = f"{content_type}_"
        target_model = target[len(prefix) :] if target.startswith(prefix) else None
        if target_model not in settings.registry.models:
            target_model = None
        if model_key is None:
            if target_model is None:
                raise InvalidSearchTarget(
                    f"cannot tell which model made '{target}': name the model in the payload", param="model"
                )
            model_key = target_model
        if collection not in (content_type, f"{content_type}_{model_key}"):
            raise InvalidSearchTarget(
                f"collection '{collection}' is neither the alias '{content_type}' nor '{content_type}_{model_key}' "
                f"of content type '{content_type}' and model '{model_key}'",
                param="collection",
            )
        if target_model is not None and target_model != model_key:
            raise InvalidSearchTarget(
                f"'{collection}' points at {target}, made by '{target_model}', not '{model_key}'",
                param="model",
            )
        size = self.vector_size(target)
        dimensions = settings.registry.models[model_key].dimensions
        if size is not None and size != dimensions:
            raise InvalidSearchTarget(
                f"collection '{target}' holds {size}-dimensional vectors; model '{model_key}' makes {dimensions}",
                param="model",
            )
        return SearchTarget(model_key=model_key, collection=collection, resolved=target)

    def vector_size(self, collection: str) -> int | None:
        """The collection's vector size, or None when it cannot be told.

        Only used for clearer error messages: when Qdrant cannot answer, the search itself will say why.
        """
        with contextlib.suppress(VectorStoreUnavailable):
            return self.vectors.vector_size(collection)
        return None

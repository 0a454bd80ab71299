"""The evaluation's errors; the migration state machine matches their class names.

`EvalDataError` (a ground truth or run file that cannot be used) lives with the loader that raises it,
and `CollectionNotFound` with the search service.
"""

from __future__ import annotations

from embedsvc.errors import EmbedServiceError, InvalidRequest, TransientError


class InvalidEvaluationRequest(InvalidRequest):
    """The evaluation request cannot be run as given (payload, collection name, model)."""

    code = "invalid_evaluation_request"


class IndexingFailed(EmbedServiceError):
    """The worker refused documents of the corpus (dead-lettered): retrying cannot help."""

    code = "evaluation_indexing_failed"


class IndexingIncomplete(TransientError):
    """Documents kept failing transiently (provider, Qdrant) after every retry; running again resumes."""

    code = "evaluation_indexing_incomplete"

"""ApiFunction: the OpenAI-compatible embeddings API, the content routes (documents, search), behind
API Gateway (REST) and its Lambda authorizer, which guards every route the template declares."""

from __future__ import annotations

import json
import time
import traceback
from typing import Annotated

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.event_handler.openapi.params import Path
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container, post_response
from embedsvc.adapters.content_store import NewContent
from embedsvc.api import (
    embeddings_response,
    error_response,
    http_error_response,
    model_list,
    principal_context,
    validation_error_response,
)
from embedsvc.errors import BudgetExceeded, EmbedServiceError, InvalidRequest
from embedsvc.models.api import (
    MAX_TOTAL_TOKENS,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
)
from embedsvc.models.documents import (
    MAX_DOCUMENT_ID_LENGTH,
    Document,
    DocumentBody,
    DocumentWriteResult,
    ImportRequest,
    ImportResult,
    SearchRequest,
    SearchResponse,
    document_id_from_path,
)
from embedsvc.models.names import CONTENT_TYPE_PATTERN
from embedsvc.observability import (
    CallContext,
    bind_correlation,
    correlation_from_api_event,
    flush_costs,
)
from embedsvc.services.documents import MAX_IMPORT_DOCUMENTS

# In Lambda, the cost roll-up is written after each answer has left (see embedsvc/post_response.py); the
# extension must register now, during init, before the runtime asks for the first invocation.
post_response.start(lambda: container.costs().flush())

# Stop waiting for budget or a provider this long before the function's timeout, to answer in time.
ANSWER_SECONDS = 1.0
CACHE_FLUSH_SECONDS = 2.0
logger = Logger()
tracer = Tracer()
app = APIGatewayRestResolver(enable_validation=True)

ContentTypePath = Annotated[
    str, Path(pattern=CONTENT_TYPE_PATTERN, description="A configured content type, e.g. `verse` or `note`.")
]
DocumentIdPath = Annotated[
    str,
    Path(
        description=f"The document's id, percent-encoded: 1 to {MAX_DOCUMENT_ID_LENGTH} characters decoded."
    ),
]


def _error(description: str) -> OpenAPIResponse:
    return {"description": description, "content": {"application/json": {"model": ErrorResponse}}}


def _ok(description: str, model) -> OpenAPIResponse:
    return {"description": description, "content": {"application/json": {"model": model}}}


def _json(status: int, body: dict) -> Response:
    return Response(status, "application/json", json.dumps(body))


def _context() -> CallContext:
    return principal_context(app.current_event, container.settings().cost_sources)


def _deadline() -> float:
    remaining = app.lambda_context.get_remaining_time_in_millis() / 1000
    return time.monotonic() + remaining - ANSWER_SECONDS


# Two 429s: the shared rate limit (retry after Retry-After) and a spent budget (do not retry).
_RATE_LIMITED = _error(
    "Rate limited (`rate_limit_exceeded`: retry after `Retry-After`), or a budget of this task or tenant "
    "is spent (`budget_exceeded`, with `x-should-retry: false`: waiting does not refill it; see "
    "`embedsvc budgets`)"
)

# Private content types are answered only for the caller's tenant: another tenant's document is a 404,
# exactly as one that does not exist, so that no route can tell whether it does.
_CONTENT_ERRORS: dict[int, OpenAPIResponse] = {
    400: _error("Invalid request (body, path, or a private content type for a key without a tenant)"),
    401: _error("Missing or wrong API key"),
    415: _error("The body is not `application/json`"),
    500: _error("Unexpected server error"),
    503: _error("The content store did not answer (nothing was committed)"),
}
# Writes to a shared content type are for its `writers` only (CONTENT_TYPES).
_WRITE_ERRORS: dict[int, OpenAPIResponse] = {
    **_CONTENT_ERRORS,
    403: _error("A shared content type this tenant may not write (`permission_denied`)"),
}


@app.post(
    "/v1/embeddings",
    summary="Create embeddings (OpenAI-compatible)",
    description=(
        "Embeds one string or up to 2,048 strings (or cl100k_base token-id arrays) with a registered "
        "model, at most 300,000 tokens in all, and no more inputs than one answer can carry (see "
        "`GET /v1/models`: `limits.max_inputs_per_response`). Cost is attributed to the `X-Cost-Source` "
        "header (default `user_query`) and `X-Task-Id`; the user is the API key's principal."
    ),
    response_description="Embeddings in OpenAI's response shape",
    responses={
        200: {"description": "Embeddings", "content": {"application/json": {"model": EmbeddingResponse}}},
        400: _error("Invalid request, or more than one request or answer may hold"),
        401: _error("Missing or wrong API key"),
        404: _error("Unknown model (`model_not_found`)"),
        415: _error("The body is not `application/json`"),
        429: _RATE_LIMITED,
        500: _error("Unexpected server error"),
        503: _error("No provider could answer"),
    },
)
def create_embeddings(request: EmbeddingRequest):
    """Embed the inputs; the body is serialised here (fast for large vectors), its schema is in `responses`."""
    context = principal_context(app.current_event, container.settings().cost_sources)
    remaining = app.lambda_context.get_remaining_time_in_millis() / 1000
    result = container.embedding_service().embed(
        request.inputs(),
        request.model,
        context=context,
        dimensions=request.dimensions,
        encoding_format=request.encoding_format,
        max_total_tokens=MAX_TOTAL_TOKENS,
        deadline=time.monotonic() + remaining - ANSWER_SECONDS,
    )
    response = embeddings_response(result, request.encoding_format)  # while the cache writes run
    # Lambda freezes the process once it answers: cache writes still pending would stall until the next
    # invocation, or be lost. They are cheap to wait for, and a miss later costs a provider call.
    container.cache().flush(timeout=CACHE_FLUSH_SECONDS)
    return response


@app.get(
    "/v1/models",
    summary="List registered models, with their request and response limits",
    responses={200: {"description": "Models", "content": {"application/json": {"model": ModelList}}}},
)
def list_models():
    """The registry's models in OpenAI's list shape."""
    return model_list(container.settings().registry)


@app.put(
    "/v1/documents/<content_type>/<document_id>",
    summary="Create or replace a document, and index it (write-through)",
    description=(
        "Commits the text and metadata to the content store (the source of truth), then embeds and writes "
        "it to every collection of the content type within the request. If the vector write fails, the "
        "answer is still 200, with `indexing: queued` (an index request is on the queue) or "
        "`pending_repair` (the hourly repair indexes it). A private content type (notes) is the caller's "
        "tenant's: the same id from another tenant is another document."
    ),
    responses={
        200: _ok("The committed document", DocumentWriteResult),
        **_WRITE_ERRORS,
        404: _error("Unknown content type (`content_type_not_found`)"),
    },
)
def put_document(content_type: ContentTypePath, document_id: DocumentIdPath, body: DocumentBody):
    """Commit first, then index; the indexing outcome is in the answer, never an error."""
    result = container.document_service().put(
        content_type,
        document_id_from_path(document_id),
        text=body.text,
        metadata=body.metadata,
        context=_context(),
        deadline=_deadline(),
    )
    container.cache().flush(timeout=CACHE_FLUSH_SECONDS)  # if the indexing cache policy is on
    return _json(200, result.to_dict())


@app.get(
    "/v1/documents/<content_type>/<document_id>",
    summary="Read a document and its indexing status in each collection",
    responses={
        200: _ok("The document, with each collection's status", Document),
        **_CONTENT_ERRORS,
        404: _error("No such document of the caller's (`document_not_found`), or unknown content type"),
    },
)
def get_document(content_type: ContentTypePath, document_id: DocumentIdPath):
    """The stored text and metadata, and per collection whether its point holds this version."""
    found = container.document_service().get(
        content_type, document_id_from_path(document_id), context=_context()
    )
    return _json(200, found)


@app.delete(
    "/v1/documents/<content_type>/<document_id>",
    summary="Delete a document, and remove it from search (write-through)",
    responses={
        200: _ok("The deleted document (`deleted: true`)", DocumentWriteResult),
        **_WRITE_ERRORS,
        404: _error("No such document of the caller's (`document_not_found`), or unknown content type"),
    },
)
def delete_document(content_type: ContentTypePath, document_id: DocumentIdPath):
    """Soft-delete in the content store, then tombstone its points; a failed tombstone is queued."""
    result = container.document_service().delete(
        content_type, document_id_from_path(document_id), context=_context()
    )
    return _json(200, result.to_dict())


@app.post(
    "/v1/documents/<content_type>:import",
    summary="Import documents in bulk; they are indexed from the queue",
    description=(
        f"Commits up to {MAX_IMPORT_DOCUMENTS:,} documents in one transaction (all or none) and queues "
        "their indexing at bulk priority, so a large import never takes the rate limit from user "
        "queries. (`:import` is a custom method on the content type, so no document id is reserved.)"
    ),
    responses={
        202: _ok("Committed; indexing queued", ImportResult),
        **_WRITE_ERRORS,
        404: _error("Unknown content type (`content_type_not_found`)"),
    },
)
def import_documents(content_type: ContentTypePath, body: ImportRequest):
    """Commit the documents together, then one by-id index request each on the queue."""
    documents = [NewContent(d.id, d.text, d.metadata) for d in body.documents]
    result = container.document_service().import_documents(content_type, documents, context=_context())
    return _json(202, result)


@app.post(
    "/v1/search",
    summary="Semantic search over one content type",
    description=(
        "Embeds the query with the model of the content type's active collection and returns the nearest "
        "live documents, best first: for a private content type only the caller's tenant's (and shared) "
        "documents. `include` reads text and metadata from the content store in one query; a hit whose "
        "document was deleted meanwhile is left out. A content type with nothing indexed yet has no hits."
    ),
    responses={
        200: _ok("Hits, best first", SearchResponse),
        **_CONTENT_ERRORS,
        404: _error("Unknown content type (`content_type_not_found`)"),
        429: _RATE_LIMITED,
        503: _error("No provider, the vector store or the content store could answer"),
    },
)
def search(request: SearchRequest):
    """The nearest documents to the query, with the fields asked for."""
    body = container.document_search().search(
        request.content_type,
        request.query,
        request.top_k,
        context=_context(),
        filters=request.filters,
        include=request.include or (),
    )
    container.cache().flush(timeout=CACHE_FLUSH_SECONDS)  # the query's vector, as after /v1/embeddings
    return _json(200, body)


@app.exception_handler(RequestValidationError)
def handle_validation(exc: RequestValidationError) -> Response:
    return validation_error_response(list(exc.errors()))


@app.exception_handler(RequestUnsupportedContentType)
def handle_content_type(_exc: RequestUnsupportedContentType) -> Response:
    content_type = app.current_event.get_header_value("Content-Type", default_value="", case_sensitive=False)
    return http_error_response(
        415,
        f"Unsupported Content-Type '{(content_type or '')[:64]}'; send 'application/json'.",
        "unsupported_media_type",
    )


@app.exception_handler(EmbedServiceError)
def handle_service_error(exc: EmbedServiceError) -> Response:
    if exc.status >= 500:
        logger.exception("request failed", extra={"code": exc.code})
    response = error_response(exc)
    if isinstance(exc, BudgetExceeded):
        # A 429 the openai SDK would retry twice; a spent budget does not refill in seconds.
        response.headers["x-should-retry"] = "false"
    return response


@app.exception_handler(ServiceError)
def handle_router_error(exc: ServiceError) -> Response:
    """Powertools' own HTTP errors, in OpenAI's shape instead of its `{"statusCode": ...}` body."""
    return http_error_response(exc.status_code, exc.msg if isinstance(exc.msg, str) else json.dumps(exc.msg))


@app.exception_handler(Exception)
def handle_unexpected(exc: Exception) -> Response:
    # The exception's message may quote request text: log its type and where it was raised, not its text.
    logger.error(
        "unexpected error",
        extra={"error_type": type(exc).__name__, "stack": traceback.format_tb(exc.__traceback__)},
    )
    return http_error_response(
        500, "The server had an error while processing your request.", "internal_error"
    )


@app.not_found
def handle_not_found(_exc: Exception) -> Response:
    return error_response(
        InvalidRequest(f"Unknown route {app.current_event.http_method} {app.current_event.path}."), status=404
    )


@logger.inject_lambda_context
@tracer.capture_lambda_handler(capture_response=False)  # answers hold vectors: never into traces
@flush_costs  # the request's costs reach the roll-up before Lambda freezes the process
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    # The caller's X-Correlation-Id, else API Gateway's request id: on every log line, on the index
    # requests this request queues (and so on the worker's lines for them), and in the answer's headers.
    correlation_id = bind_correlation(correlation_from_api_event(event), logger=logger, tracer=tracer)
    answer = app.resolve(event, context)
    headers = answer.get("multiValueHeaders")
    if isinstance(headers, dict):
        headers["X-Correlation-Id"] = [correlation_id]
    else:
        answer.setdefault("headers", {})["X-Correlation-Id"] = correlation_id
    return answer

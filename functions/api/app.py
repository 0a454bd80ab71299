"""ApiFunction: the OpenAI-compatible embeddings API behind API Gateway (REST) and the Lambda authorizer."""

from __future__ import annotations

import json
import time
import traceback

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.api import (
    embeddings_response,
    error_response,
    http_error_response,
    model_list,
    principal_context,
    validation_error_response,
)
from embedsvc.errors import EmbedServiceError, InvalidRequest
from embedsvc.models.api import (
    MAX_TOTAL_TOKENS,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
)

# Stop waiting for budget or a provider this long before the function's timeout, to answer in time.
ANSWER_SECONDS = 1.0
CACHE_FLUSH_SECONDS = 2.0
logger = Logger()
tracer = Tracer()
app = APIGatewayRestResolver(enable_validation=True)


def _error(description: str) -> OpenAPIResponse:
    return {"description": description, "content": {"application/json": {"model": ErrorResponse}}}


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
        429: _error("Rate limited; see Retry-After"),
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
    return error_response(exc)


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


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler(capture_response=False)  # answers hold vectors: never into traces
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)

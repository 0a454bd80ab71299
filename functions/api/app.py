"""ApiFunction: the OpenAI-compatible embeddings API behind API Gateway (REST) and the Lambda authorizer."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from embedsvc import container
from embedsvc.api import (
    embeddings_response,
    error_response,
    model_list,
    principal_context,
    validation_error_response,
)
from embedsvc.errors import EmbedServiceError, InvalidRequest
from embedsvc.models.api import EmbeddingRequest, EmbeddingResponse, ErrorResponse

logger = Logger()
tracer = Tracer()
app = APIGatewayRestResolver(enable_validation=True)


@app.post(
    "/v1/embeddings",
    summary="Create embeddings (OpenAI-compatible)",
    description=(
        "Embeds one string or up to 2,048 strings with a registered model. Cost is attributed to the "
        "`X-Cost-Source` header (default `user_query`) and `X-Task-Id`; the user is the API key's principal."
    ),
    response_description="Embeddings in OpenAI's response shape",
    responses={
        200: {"description": "Embeddings", "content": {"application/json": {"model": EmbeddingResponse}}},
        400: {"description": "Invalid request", "content": {"application/json": {"model": ErrorResponse}}},
        401: {
            "description": "Missing or wrong API key",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        429: {
            "description": "Rate limited; see Retry-After",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        503: {
            "description": "No provider could answer",
            "content": {"application/json": {"model": ErrorResponse}},
        },
    },
)
def create_embeddings(request: EmbeddingRequest):
    """Embed the inputs; the body is serialised here (fast for large vectors), its schema is in `responses`."""
    context = principal_context(app.current_event, container.settings().cost_sources)
    result = container.embedding_service().embed(
        request.inputs(), request.model, context=context, dimensions=request.dimensions
    )
    return embeddings_response(result, request.encoding_format)


@app.get("/v1/models", summary="List registered models")
def list_models():
    return model_list(container.settings().registry)


@app.exception_handler(RequestValidationError)
def handle_validation(exc: RequestValidationError) -> Response:
    return validation_error_response(list(exc.errors()))


@app.exception_handler(EmbedServiceError)
def handle_service_error(exc: EmbedServiceError) -> Response:
    if exc.status >= 500:
        logger.exception("request failed", extra={"code": exc.code})
    return error_response(exc)


@app.not_found
def handle_not_found(_exc: Exception) -> Response:
    return error_response(
        InvalidRequest(f"Unknown route {app.current_event.http_method} {app.current_event.path}."), status=404
    )


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)

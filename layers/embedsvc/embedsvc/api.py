"""Shaping API answers: OpenAI's response and error bodies, and the caller's cost context."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import orjson
from aws_lambda_powertools.event_handler import Response

from embedsvc.config import Registry
from embedsvc.errors import EmbedServiceError, InvalidRequest
from embedsvc.models.api import MAX_INPUTS, MAX_TOTAL_TOKENS
from embedsvc.models.names import MAX_TAG_LENGTH
from embedsvc.observability import CallContext
from embedsvc.services.response_limits import max_inputs_per_response

JSON = "application/json"


def principal_context(event, allowed_sources: list[str]) -> CallContext:
    """Cost tags: source and task from headers; the user only from the authorizer, never from the body."""
    authorizer = event.request_context.authorizer
    raw = authorizer.raw_event if authorizer else {}
    header = event.get_header_value("X-Cost-Source", default_value="user_query", case_sensitive=False)
    source = (header or "user_query").strip().lower()
    if source not in allowed_sources:
        raise InvalidRequest(
            f"Unknown cost source {source[:64]!r} in X-Cost-Source; allowed: {', '.join(allowed_sources)}.",
            param="X-Cost-Source",
        )
    task_id = event.get_header_value("X-Task-Id", case_sensitive=False)
    if task_id is not None and len(task_id) > MAX_TAG_LENGTH:
        # It travels in every cost record and log line: bounded, like every free-form tag.
        raise InvalidRequest(
            f"X-Task-Id has {len(task_id)} characters; at most {MAX_TAG_LENGTH} are allowed.",
            param="X-Task-Id",
        )
    return CallContext(
        source=source,
        user_id=raw.get("user_id") or raw.get("principalId"),
        tenant_id=raw.get("tenant_id"),
        task_id=task_id,
    )


def embeddings_response(result, encoding_format: str) -> Response:
    """OpenAI's response shape; base64 is the float32 little-endian bytes, as OpenAI sends them."""
    if encoding_format == "base64":
        rows = np.ascontiguousarray(result.vectors, dtype="<f4")  # one conversion, not one per vector
        embeddings: list = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        embeddings = list(
            result.vectors
        )  # orjson writes numpy rows natively, ~10x faster than json + tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)],
        "model": result.model.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    return Response(200, JSON, payload, headers={"X-Cache-Hits": str(result.cache_hits)})


def model_list(registry: Registry) -> Response:
    """OpenAI's model list, each entry with its request and response limits."""
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "embedsvc",
            "key": m.key,
            "dimensions": m.dimensions,
            "limits": {
                "max_inputs_per_request": MAX_INPUTS,
                "max_input_tokens": m.max_input_tokens,
                "max_total_tokens": MAX_TOTAL_TOKENS,
                "max_inputs_per_response": {
                    fmt: max_inputs_per_response(m.dimensions, fmt, m.name) for fmt in ("float", "base64")
                },
            },
        }
        for m in registry.models.values()
    ]
    return Response(200, JSON, json.dumps({"object": "list", "data": data}))


def error_response(exc: EmbedServiceError, status: int | None = None) -> Response:
    """An error of the service's hierarchy as OpenAI's error body, with Retry-After where known."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return Response(status or exc.status, JSON, json.dumps(exc.to_openai()), headers=headers)


def http_error_response(status: int, message: str, code: str | None = None) -> Response:
    """Any other HTTP error (the router's own, an unexpected failure) in OpenAI's error body."""
    etype = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return Response(status, JSON, json.dumps(body))


def validation_error_response(errors: list[dict]) -> Response:
    """Pydantic's validation errors, told as OpenAI tells them: one message, the offending parameter."""
    first = errors[0] if errors else {}
    # Where pydantic found it (body, path, query, header) is not part of the parameter's name; only the
    # first element says where (a body field may well be called "query").
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "path", "query", "header"):
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request."
        param = None
    elif loc and loc[0] == "input" and first.get("type") == "input_shape":
        message = first.get("msg", "'input' is invalid.")  # the request model's own, naming the item
        param = "input"
    elif loc and loc[0] == "input" and first.get("type") != "missing":
        # A union error (four branches) names pydantic's branches; say what the input may be.
        message = (
            "'input' must be a non-empty string, an array of non-empty strings, an array of token ids "
            "or an array of token-id arrays."
        )
        param = "input"
    else:
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        message = f"Invalid value for '{where}': {first.get('msg', 'invalid')}."
        if param is None and first.get("type") == "missing":
            message = "The request body is missing required fields."
    return error_response(InvalidRequest(message, param=param))

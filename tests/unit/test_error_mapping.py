"""Errors become OpenAI-shaped HTTP answers in one place (embedsvc.api)."""

from __future__ import annotations

import json

import pytest

from embedsvc.api import error_response, validation_error_response
from embedsvc.errors import (
    AllProvidersFailed,
    EmbedServiceError,
    InvalidRequest,
    LedgerUnavailable,
    ProviderRejected,
    ServiceOverloaded,
    Unauthorized,
    UnknownModel,
)


@pytest.mark.parametrize(
    ("error", "status", "etype", "code", "retryable"),
    [
        (InvalidRequest("bad", param="input"), 400, "invalid_request_error", "invalid_request", False),
        (UnknownModel("gpt-x", ["a", "b"]), 404, "invalid_request_error", "model_not_found", False),
        (ProviderRejected("no"), 400, "invalid_request_error", "provider_rejected", False),
        (Unauthorized("who"), 401, "invalid_request_error", "invalid_api_key", False),
        (ServiceOverloaded("busy", retry_after=2.2), 429, "rate_limit_exceeded", "rate_limit_exceeded", True),
        (AllProvidersFailed("down"), 503, "server_error", "all_providers_failed", True),
        (LedgerUnavailable("ddb"), 503, "server_error", "rate_limit_ledger_unavailable", True),
        (EmbedServiceError("boom"), 500, "server_error", "internal_error", False),
    ],
)
def test_each_error_maps_to_its_status_and_openai_body(error, status, etype, code, retryable):
    response = error_response(error)
    body = json.loads(response.body)
    assert response.status_code == status
    assert body == {"error": {"message": error.message, "type": etype, "param": error.param, "code": code}}
    assert error.retryable is retryable


def test_retry_after_is_rounded_up_to_whole_seconds_and_at_least_one():
    assert error_response(ServiceOverloaded("busy", retry_after=2.2)).headers["Retry-After"] == "3"
    assert error_response(ServiceOverloaded("busy", retry_after=0.01)).headers["Retry-After"] == "1"
    assert "Retry-After" not in error_response(InvalidRequest("bad")).headers


def test_unknown_model_lists_the_known_ones():
    assert "Known models: a, b." in UnknownModel("gpt-x", ["a", "b"]).message


@pytest.mark.parametrize(
    ("errors", "param", "fragment"),
    [
        ([{"type": "json_invalid", "loc": ("body", 0), "msg": "x"}], None, "parse the JSON"),
        (
            [{"type": "string_type", "loc": ("body", "input", "str"), "msg": "x"}],
            "input",
            "an array of token-id arrays",
        ),
        (
            [
                {
                    "type": "input_shape",
                    "loc": ("body", "input"),
                    "msg": "'input' mixes a and b; send one kind.",
                }
            ],
            "input",
            "'input' mixes a and b",
        ),
        ([{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}], "model", "Field required"),
        (
            [
                {
                    "type": "literal_error",
                    "loc": ("body", "encoding_format"),
                    "msg": "Input should be 'float' or 'base64'",
                }
            ],
            "encoding_format",
            "'float' or 'base64'",
        ),
        ([], None, "body"),
    ],
)
def test_validation_errors_name_the_parameter(errors, param, fragment):
    response = validation_error_response(errors)
    body = json.loads(response.body)["error"]
    assert response.status_code == 400
    assert body["param"] == param
    assert fragment in body["message"]

"""The API never spends tokens on an answer Lambda cannot return, and the local gateway fails as AWS does.

Worst-case answers (every float at orjson's longest float32 text) go through the real handler; their
size is measured as the Lambda runtime serializes the proxy response.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from embedsvc.config import DEFAULT_REGISTRY
from embedsvc.local.gateway import LocalGateway, lambda_payload_bytes
from embedsvc.local.provider_sim import ProviderSimulator
from embedsvc.services.response_limits import (
    ENVELOPE_RESERVE_BYTES,
    LAMBDA_RESPONSE_LIMIT_BYTES,
    item_bytes_bound,
    max_inputs_per_response,
)

WORST_FLOAT32 = np.float32(-0.0000127660915)  # orjson writes it in 16 characters, the most for a float32


def worst_vector(text: str, dimensions: int) -> np.ndarray:
    return np.full(dimensions, WORST_FLOAT32, dtype=np.float32)


def sim_entry(key: str, **overrides) -> dict:
    """A registry model, served by the local simulator."""
    base = {**DEFAULT_REGISTRY["models"][key], **overrides}
    return {**base, "endpoints": [{"provider": "sim", "model_name": base["name"]}]}


@pytest.fixture
def worst_sim():
    with ProviderSimulator(vector_fn=worst_vector, dimensions={"all-MiniLM-L6-v2": 384}) as server:
        yield server


@pytest.fixture
def limits_service(aws, worst_sim, emf, monkeypatch):
    """te3s, te3l and a MiniLM-sized model, all answered by a simulator returning worst-case floats."""
    from embedsvc import container
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder

    registry = {
        "default_model": "te3s",
        "providers": {
            "sim": {
                "key": "sim",
                "kind": "openai",
                "base_url": worst_sim.base_url,
                "api_key_env": "SIM_API_KEY",
            }
        },
        "models": {
            "te3s": sim_entry("te3s"),
            "te3l": sim_entry("te3l"),
            # The estimate tokenizer: the test needs MiniLM's size and limits, not its tokenizer.
            "minilm": sim_entry("minilm", tokenizer="estimate"),
        },
    }
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(registry))
    reset_settings()
    container.put("costs", CostRecorder(sink=emf.append))
    return container


@pytest.fixture
def cache_lookups(limits_service, monkeypatch) -> list[int]:
    """How many keys each cache lookup asked for."""
    cache = limits_service.cache()
    seen: list[int] = []
    original = cache.get_many

    def spy(keys):
        seen.append(len(keys))
        return original(keys)

    monkeypatch.setattr(cache, "get_many", spy)
    return seen


def invoke(body: dict) -> dict:
    """The real handler's proxy response for one request."""
    from embedsvc.local.lambda_context import LocalLambdaContext
    from functions.api.app import lambda_handler
    from tests.conftest import api_event

    return lambda_handler(api_event(body), LocalLambdaContext("api"))


def texts(count: int) -> list[str]:
    return [f"verse {i}" for i in range(count)]


def without_answer_check(monkeypatch) -> None:
    """Let a request through that the API would refuse, to see what AWS would do with its answer."""
    from embedsvc.services import api_limits

    monkeypatch.setattr(api_limits, "check_answer_fits", lambda *args: None)


CASES = [
    ("text-embedding-3-small", 1536, "float", 240),
    ("text-embedding-3-small", 1536, "base64", 762),
    ("text-embedding-3-small", 256, "float", 1426),
    ("text-embedding-3-large", 3072, "float", 120),
    ("text-embedding-3-large", 3072, "base64", 382),
    ("all-MiniLM-L6-v2", 384, "float", 955),
]


@pytest.mark.parametrize(("model", "dims", "fmt", "expected"), CASES)
def test_the_most_inputs_the_api_accepts_fit_one_lambda_answer_and_a_few_percent_more_would_not(
    limits_service, worst_sim, monkeypatch, model, dims, fmt, expected
):
    limit = max_inputs_per_response(dims, fmt, model)
    assert limit == expected  # the numbers README gives
    dimensions = dims if dims != 1536 or model != "text-embedding-3-small" else None
    answer = invoke({"input": texts(limit), "model": model, "encoding_format": fmt, "dimensions": dimensions})
    assert answer["statusCode"] == 200, answer["body"][:300]
    size = lambda_payload_bytes(answer, ensure_ascii=True)
    assert size <= LAMBDA_RESPONSE_LIMIT_BYTES
    # The bound is tight: what is left is less than one item plus the envelope's reserve.
    assert LAMBDA_RESPONSE_LIMIT_BYTES - size < item_bytes_bound(dims, fmt) + ENVELOPE_RESERVE_BYTES
    # A few percent more inputs would be an answer Lambda refuses (a 502 after the provider was paid).
    without_answer_check(monkeypatch)
    more = limit + math.ceil(0.02 * limit)
    over = invoke({"input": texts(more), "model": model, "encoding_format": fmt, "dimensions": dimensions})
    assert over["statusCode"] == 200
    assert lambda_payload_bytes(over, ensure_ascii=True) > LAMBDA_RESPONSE_LIMIT_BYTES


def test_a_model_whose_every_answer_fits_is_capped_by_the_input_limit_only(limits_service):
    assert max_inputs_per_response(384, "base64", "all-MiniLM-L6-v2") == 2048
    answer = invoke({"input": texts(2048), "model": "all-MiniLM-L6-v2", "encoding_format": "base64"})
    assert answer["statusCode"] == 200
    assert lambda_payload_bytes(answer, ensure_ascii=True) <= LAMBDA_RESPONSE_LIMIT_BYTES


def test_one_input_too_many_is_a_400_naming_the_limit_before_cache_or_provider(
    limits_service, worst_sim, cache_lookups
):
    answer = invoke({"input": texts(241), "model": "text-embedding-3-small"})
    body = json.loads(answer["body"])
    assert answer["statusCode"] == 400
    assert body["error"]["param"] == "input" and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert "at most 240" in message and "'base64' (762)" in message and "chunk_size" in message
    assert worst_sim.calls == 0 and cache_lookups == []


def test_fewer_dimensions_let_more_inputs_through(limits_service, worst_sim):
    answer = invoke({"input": texts(500), "model": "text-embedding-3-small", "dimensions": 512})
    assert answer["statusCode"] == 200  # 717 fit at 512 dimensions
    assert worst_sim.calls == 1


def test_more_than_300000_tokens_is_a_400_naming_both_totals(limits_service, worst_sim, cache_lookups):
    long_text = "word " * 7999  # 8,000 cl100k tokens (" word" is one; "word" starts it)
    answer = invoke(
        {"input": [long_text] * 40, "model": "text-embedding-3-small", "encoding_format": "base64"}
    )
    body = json.loads(answer["body"])
    assert answer["statusCode"] == 400, body
    assert "320,000 tokens in total" in body["error"]["message"]
    assert "at most 300,000" in body["error"]["message"]
    assert worst_sim.calls == 0 and cache_lookups == []


def test_the_token_cap_counts_token_ids_exactly(limits_service, worst_sim):
    at_cap = [[1] * 7500] * 40  # 300,000 ids
    answer = invoke({"input": at_cap, "model": "text-embedding-3-small", "encoding_format": "base64"})
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"])["usage"]["prompt_tokens"] == 300_000
    over = invoke({"input": [*at_cap[:-1], [1] * 7501], "model": "text-embedding-3-small"})
    assert over["statusCode"] == 400
    assert "300,001 tokens in total" in json.loads(over["body"])["error"]["message"]
    assert worst_sim.calls == 1


def test_the_token_cap_applies_to_a_model_without_openais_tokenizer(limits_service, worst_sim, cache_lookups):
    # 2,048 inputs of 200 estimated tokens: within MiniLM's 256 per input, 409,600 in all.
    answer = invoke(
        {"input": ["abcd" * 200] * 2048, "model": "all-MiniLM-L6-v2", "encoding_format": "base64"}
    )
    body = json.loads(answer["body"])
    assert answer["statusCode"] == 400, body
    assert "409,600 tokens in total" in body["error"]["message"]
    assert worst_sim.calls == 0 and cache_lookups == []


def allow_all(event, context) -> dict:
    return {
        "principalId": "user-1",
        "policyDocument": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*"}]},
        "context": {"tenant_id": "tenant-a", "user_id": "user-1"},
    }


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v1/embeddings",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def gateway_for():
    started: list[LocalGateway] = []

    def start(handler, **kwargs) -> LocalGateway:
        gateway = LocalGateway(handler, allow_all, port=0, **kwargs).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def server_error(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def test_gateway_answers_502_for_an_answer_over_lambdas_limit(
    limits_service, worst_sim, gateway_for, monkeypatch
):
    from functions.api.app import lambda_handler

    gateway = gateway_for(lambda_handler)
    request = {"model": "text-embedding-3-small", "encoding_format": "float"}
    assert post(gateway.url, json.dumps({**request, "input": texts(240)}).encode())[0] == 200
    without_answer_check(monkeypatch)
    status, body = post(gateway.url, json.dumps({**request, "input": texts(250)}).encode())
    assert (status, body) == (502, server_error("Internal server error"))
    assert worst_sim.calls == 2  # the second one was paid for and thrown away, as on AWS


def test_gateway_answers_500_for_an_event_over_lambdas_request_limit(gateway_for):
    calls: list[dict] = []
    gateway = gateway_for(lambda event, context: calls.append(event) or {"statusCode": 200, "body": "{}"})
    # 6.2 MB of body is under API Gateway's 10 MB, but the event carrying it (escaped) is over 6 MiB.
    body = json.dumps({"model": "m", "input": ['"quoted"' * 1000] * 700}).encode()
    assert 6_000_000 < len(body) < 10 * 1024 * 1024
    assert post(gateway.url, body) == (500, server_error("Internal server error"))
    assert calls == []  # Lambda refused the invocation


def test_gateway_answers_413_past_api_gateways_10_mb(gateway_for):
    gateway = gateway_for(lambda event, context: {"statusCode": 200, "body": "{}"})
    status, body = post(gateway.url, b"x" * (10 * 1024 * 1024 + 1))
    assert status == 413
    assert body == {
        "error": {"message": "Request Too Long", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_gateway_answers_504_past_the_integration_timeout(gateway_for):
    def slow(event, context):
        time.sleep(1.0)
        return {"statusCode": 200, "body": "{}"}

    gateway = gateway_for(slow, integration_timeout_seconds=0.2)
    assert post(gateway.url, b"{}") == (504, server_error("Endpoint request timed out"))


def test_gateway_answers_502_when_the_function_raises(gateway_for):
    def broken(event, context):
        raise RuntimeError("boom")

    gateway = gateway_for(broken)
    assert post(gateway.url, b"{}") == (502, server_error("Internal server error"))


def test_gateway_answers_401_without_a_key_and_403_for_a_deny_policy(gateway_for):
    def deny(event, context):
        return {"principalId": "u", "policyDocument": {"Statement": [{"Effect": "Deny", "Action": "*"}]}}

    gateway = LocalGateway(lambda e, c: {"statusCode": 200, "body": "{}"}, deny, port=0).start()
    try:
        request = urllib.request.Request(gateway.url + "/v1/embeddings", data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=5)
        assert missing.value.code == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"
        status, body = post(gateway.url, b"{}")
        assert status == 403 and body["error"]["code"] == "invalid_api_key"
    finally:
        gateway.stop()

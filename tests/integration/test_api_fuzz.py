"""A property-based fuzz of the API from openapi.json, through the real handler.

Requests come from the committed OpenAPI document (schemathesis: valid ones, and ones that break the
schema), some with a registered model put in so that they reach the providers, with fuzzed cost
headers and content types. Whatever comes in: no 5xx, only documented statuses, every 4xx in OpenAI's
error shape, and no provider call for a request the API refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.models.api import EmbeddingResponse, ModelList
from tests.conftest import api_event

OPENAPI = json.loads((Path(__file__).resolve().parents[2] / "openapi.json").read_text())
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
EMBEDDINGS = SCHEMA["/v1/embeddings"]["POST"]
MODELS = SCHEMA["/v1/models"]["GET"]
EXAMPLES = 300

# Models the simulator serves; a generated model name is almost always unknown (a 404).
KNOWN_MODELS = st.sampled_from(["text-embedding-3-small", "te3s", "small-test-model"])
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "text/plain"]
        ),
        "X-Task-Id": st.text(max_size=200),
        "X-Cost-Source": st.sampled_from(["user_query", "note_index", "REINDEX "]) | st.text(max_size=20),
    },
)
POSITIVE = EMBEDDINGS.as_strategy(generation_mode=GenerationMode.POSITIVE)
REQUESTS = st.one_of(
    st.tuples(POSITIVE, KNOWN_MODELS, st.just({})),  # valid bodies for registered models
    st.tuples(POSITIVE, st.none() | KNOWN_MODELS, HEADERS),
    st.tuples(
        EMBEDDINGS.as_strategy(generation_mode=GenerationMode.NEGATIVE), st.none() | KNOWN_MODELS, HEADERS
    ),
    st.tuples(MODELS.as_strategy(), st.none(), st.just({})),
)
ERROR_KEYS = {"message", "type", "param", "code"}


def event_for(case, model: str | None, headers: dict) -> dict:
    """The REST proxy event API Gateway would send for a generated request."""
    if case.method == "GET":
        return api_event(None, raw=True, path=case.path, method="GET", headers=headers)
    body = case.body
    if model is not None and isinstance(body, dict):
        body = {**body, "model": model}
    if isinstance(body, NotSet):
        text = None
    elif isinstance(body, bytes):  # a negative case may send raw bytes, as a client could
        text = body.decode("utf-8", errors="replace")
    else:
        text = json.dumps(body)
    content_type = {"Content-Type": case.media_type} if case.media_type else {}
    return api_event(text, raw=True, path=case.path, method=case.method, headers={**content_type, **headers})


def input_count(body: dict) -> int:
    value = body["input"]
    return 1 if isinstance(value, str) or (value and isinstance(value[0], int)) else len(value)


def assert_openai_error(body: dict) -> None:
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in {"invalid_request_error", "rate_limit_exceeded", "server_error"}
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


@settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same examples every run: a fuzz in `make test` must not flake
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(request=REQUESTS)
def test_the_api_answers_every_generated_request_as_openai_would(service, sim, request):
    from functions.api.app import lambda_handler

    case, model, headers = request
    proxy_event = event_for(case, model, headers)
    calls = sim.calls
    answer = lambda_handler(proxy_event, LocalLambdaContext("api"))
    status = answer["statusCode"]
    event(f"{case.method} {status}")  # the mix of answers, in --hypothesis-show-statistics
    operation = OPENAPI["paths"][case.path][case.method.lower()]
    assert status < 500, answer["body"]
    assert str(status) in operation["responses"], (status, answer["body"])
    body = json.loads(answer["body"])
    if status >= 400:
        assert_openai_error(body)
        assert sim.calls == calls, "a rejected request reached the provider"
    elif case.method == "GET":
        ModelList.model_validate(body)
    else:
        sent = json.loads(proxy_event["body"])
        assert len(EmbeddingResponse.model_validate(body).data) == input_count(sent)

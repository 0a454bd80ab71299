"""POST /v1/embeddings through the real handler, moto, and local OpenAI-compatible providers over HTTP."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from embedsvc.local.provider_sim import Fault, hash_vector

TE3S = "text-embedding-3-small"


def test_float_response_has_openai_shape_and_provider_vectors(service, call_api, sim):
    status, body, _ = call_api({"input": ["hello", "world"], "model": TE3S})
    assert status == 200
    assert body["object"] == "list" and body["model"] == TE3S
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert np.allclose(body["data"][1]["embedding"], hash_vector("world", 1536), atol=1e-6)
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert sim.calls == 1


def test_base64_response_decodes_to_float32_vectors(service, call_api):
    status, body, _ = call_api({"input": "hello", "model": TE3S, "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, hash_vector("hello", 1536))


def test_model_key_is_accepted_as_well_as_its_name(service, call_api):
    status, body, _ = call_api({"input": "hello", "model": "te3s"})
    assert status == 200 and body["model"] == TE3S


def test_dimensions_are_passed_to_a_model_that_supports_them(service, call_api, sim):
    status, body, _ = call_api({"input": "hello", "model": TE3S, "dimensions": 256})
    assert status == 200
    assert len(body["data"][0]["embedding"]) == 256


def test_429_with_retry_after_is_waited_out_then_succeeds(service, call_api, sim, sim2):
    sim.inject(Fault(status=429, headers={"retry-after-ms": "300"}))
    status, body, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 200
    assert [r.status for r in sim.records] == [429, 200]
    assert sim2.calls == 0  # a 429 is waited out at the same provider, not a reason to switch
    assert sim.records[1].at - sim.records[0].at >= 0.29  # the ledger's cooldown held the retry back


def test_500_falls_back_to_the_next_provider_of_the_same_model(service, call_api, sim, sim2):
    sim.inject(Fault(status=500))
    status, body, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 200
    assert [r.status for r in sim.records] == [500]
    assert [r.model for r in sim2.records] == [TE3S]
    assert np.allclose(body["data"][0]["embedding"], hash_vector("hello", 1536), atol=1e-6)


@pytest.mark.parametrize(
    "broken",
    [
        "<html>502 Bad Gateway</html>",
        '{"object": "list"}',
        '{"data": [{"index": 0}]}',
        '{"data": [{"embedding": "AAAA"}]}',
    ],
)
def test_a_200_whose_body_is_not_embeddings_falls_back_with_the_reason(service, call_api, sim, sim2, broken):
    # Given a first endpoint that answers 200 with something other than an embeddings list
    sim.inject(Fault(body=broken))
    # When a request comes, Then the next endpoint serves it
    status, body, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 200
    assert sim2.calls == 1
    assert np.allclose(body["data"][0]["embedding"], hash_vector("hello", 1536), atol=1e-6)
    # and with no endpoint left, the 503 says what the answer was
    sim.inject(Fault(body=broken))
    sim2.inject(Fault(body=broken))
    status, body, _ = call_api({"input": "hello again", "model": TE3S})
    assert status == 503
    assert "not an embeddings list" in body["error"]["message"]


def test_timeout_falls_back_to_the_next_provider(service, call_api, sim, sim2):
    sim.inject(Fault(delay_seconds=3.0))  # the provider's timeout is 2 s
    status, _, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 200
    assert sim2.calls == 1


def test_all_providers_failing_is_a_503_with_openai_error(service, call_api, sim, sim2):
    sim.inject(Fault(status=500))
    sim2.inject(Fault(status=502))
    status, body, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 503
    assert body["error"]["code"] == "all_providers_failed"


def test_provider_rejecting_the_request_is_not_retried_elsewhere(service, call_api, sim, sim2):
    sim.inject(Fault(status=400, message="bad input"))
    status, body, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 400
    assert body["error"]["code"] == "provider_rejected"
    assert sim2.calls == 0


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"input": "", "model": TE3S}, "input", "empty"),
        ({"input": ["ok", "  "], "model": TE3S}, "input", "input[1]"),
        ({"input": [], "model": TE3S}, "input", "empty list"),
        ({"input": ["x"] * 2049, "model": TE3S}, "input", "at most 2048"),
        ({"input": "word " * 9000, "model": TE3S}, "input", "at most 8192"),
        ({"input": ["ok", 3], "model": TE3S}, "input", "mixes strings and token ids"),
        ({"input": [1, [2]], "model": TE3S}, "input", "mixes token ids and token-id arrays"),
        ({"input": [[1, "a"]], "model": TE3S}, "input", "'input[0][1]' must be an integer token id"),
        ({"input": [True], "model": TE3S}, "input", "'input[0]' must be a string, a token id"),
        ({"input": [[1.5]], "model": TE3S}, "input", "'input[0][0]' must be an integer"),
        ({"input": 5, "model": TE3S}, "input", "array of token-id arrays"),
        ({"input": [[]], "model": TE3S}, "input", "'input[0]' is an empty array of token ids"),
        ({"input": [[1, -1]], "model": TE3S}, "input", "'input[0][1]' is not a cl100k_base token id"),
        ({"input": [[100256]], "model": TE3S}, "input", "ids run from 0 to 100255"),
        ({"input": [10**30], "model": TE3S}, "input", "not a cl100k_base token id"),
        ({"input": [[220]], "model": TE3S}, "input", "empty strings cannot be embedded"),  # a lone space
        ({"input": [[1] * 8193], "model": TE3S}, "input", "8193 tokens"),
        ({"input": "\ud800 half an emoji", "model": TE3S}, "input", "not valid Unicode"),
        ({"input": "hi", "model": "small-test-model", "dimensions": 4}, "dimensions", "does not support"),
        ({"input": "hi", "model": TE3S, "dimensions": 4096}, "dimensions", "between 1 and 1536"),
        ({"input": "hi", "model": TE3S, "encoding_format": "int8"}, "encoding_format", "encoding_format"),
        ({"model": TE3S}, "input", "input"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape_without_a_provider_call(
    service, call_api, sim, body, param, fragment
):
    status, answer, _ = call_api(body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert sim.calls == 0


def test_unknown_model_is_a_404_model_not_found_as_openai_answers(service, call_api, sim):
    status, answer, _ = call_api({"input": "hi", "model": "gpt-nope"})
    assert status == 404
    assert answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
    assert "does not exist" in answer["error"]["message"]
    assert sim.calls == 0


def test_a_body_that_is_not_json_is_a_415_in_openai_shape(service, call_api, sim):
    status, answer, _ = call_api("input=hello", raw=True, headers={"Content-Type": "text/plain"})
    assert status == 415
    assert answer["error"]["type"] == "invalid_request_error" and "text/plain" in answer["error"]["message"]
    assert sim.calls == 0


def test_an_unexpected_exception_is_a_500_in_openai_shape_logged_without_the_text(
    service, call_api, sim, monkeypatch, caplog
):
    secret = "my private note"

    def explode(*args, **kwargs):
        raise KeyError(secret)  # as if some code quoted the input in its message

    monkeypatch.setattr(type(service.embedding_service()), "embed", explode)
    status, answer, _ = call_api({"input": secret, "model": TE3S})
    assert status == 500
    assert answer == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    (record,) = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert record.error_type == "KeyError"
    assert "explode" in "".join(record.stack)  # where it was raised
    assert secret not in str(record.__dict__)


def test_an_over_long_task_id_is_a_400_naming_the_header(service, call_api, sim):
    from embedsvc.models.names import MAX_TAG_LENGTH

    ok = call_api({"input": "hello", "model": TE3S}, headers={"X-Task-Id": "t" * MAX_TAG_LENGTH})
    assert ok[0] == 200
    status, answer, _ = call_api({"input": "hello", "model": TE3S}, headers={"X-Task-Id": "t" * 129})
    assert status == 400
    assert answer["error"]["param"] == "X-Task-Id" and str(MAX_TAG_LENGTH) in answer["error"]["message"]
    assert sim.calls == 1


def test_malformed_json_is_a_400(service, call_api, sim):
    status, answer, _ = call_api("{not json", raw=True)
    assert status == 400
    assert "parse the JSON" in answer["error"]["message"]
    assert sim.calls == 0


def test_unknown_route_is_a_404_in_openai_shape(service, call_api):
    status, answer, _ = call_api({}, path="/v1/nothing", method="GET")
    assert status == 404 and "Unknown route" in answer["error"]["message"]


def test_cache_hit_makes_no_provider_call_and_costs_nothing(service, call_api, sim, emf):
    call_api({"input": ["alpha", "beta"], "model": TE3S})
    assert sim.calls == 1
    emitted = len([b for b in emf if "Tokens" in b])
    status, body, headers = call_api({"input": ["beta", "alpha"], "model": TE3S})
    assert status == 200
    assert sim.calls == 1
    assert headers["x-cache-hits"] == "2"
    assert len([b for b in emf if "Tokens" in b]) == emitted  # no provider call, no cost event
    (saved,) = [b for b in emf if "SavedTokens" in b]  # the hits are counted as saved instead
    assert saved["SavedTokens"] == [2] and saved["source"] == "user_query"
    assert np.allclose(body["data"][0]["embedding"], hash_vector("beta", 1536), atol=1e-6)


def test_cache_survives_a_cold_process(service, call_api, sim):
    call_api({"input": "alpha", "model": TE3S})
    service.cache().flush()
    service.cache().clear_memory()  # a new Lambda container: only DynamoDB remembers
    call_api({"input": "alpha", "model": TE3S})
    assert sim.calls == 1


def test_repeated_text_in_one_request_is_embedded_once(service, call_api, sim):
    status, body, _ = call_api({"input": ["same", "same", "other"], "model": TE3S})
    assert status == 200 and len(body["data"]) == 3
    assert sim.records[0].inputs == 2


def test_cost_metric_carries_source_and_model_dimensions_and_user_properties(service, call_api, emf):
    call_api(
        {"input": "hello there", "model": TE3S}, headers={"X-Cost-Source": "note_index", "X-Task-Id": "job-7"}
    )
    (blob,) = [b for b in emf if "Tokens" in b]
    directive = blob["_aws"]["CloudWatchMetrics"][0]
    # Per (source, model), and per source: the alarms' and dashboards' per-source totals.
    assert directive["Dimensions"] == [["source", "model"], ["source"]]
    assert {m["Name"] for m in directive["Metrics"]} == {"Tokens", "CostUSD", "ProviderRequests"}
    assert blob["source"] == "note_index" and blob["model"] == "te3s"
    # Powertools writes metric values as lists (one entry per data point).
    assert blob["Tokens"] == [2]
    assert blob["CostUSD"] == [pytest.approx(2 * 0.02 / 1e6)]
    assert blob["user_id"] == "user-1" and blob["tenant_id"] == "tenant-a" and blob["task_id"] == "job-7"


def test_source_defaults_to_user_query_and_user_cannot_be_set_from_the_body(service, call_api, emf):
    call_api({"input": "hello", "model": TE3S, "user": "someone-else"})
    assert emf[0]["source"] == "user_query"
    assert emf[0]["user_id"] == "user-1"


def test_models_route_lists_the_registry_with_created_owner_and_limits(service, call_api):
    status, body, _ = call_api(None, path="/v1/models", method="GET", raw=True)
    assert status == 200
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {TE3S, "small-test-model"}
    te3s = models[TE3S]
    assert te3s["object"] == "model" and te3s["created"] == 1705948997 and te3s["owned_by"] == "embedsvc"
    assert te3s["limits"] == {
        "max_inputs_per_request": 2048,
        "max_input_tokens": 8192,
        "max_total_tokens": 300_000,
        "max_inputs_per_response": {"float": 240, "base64": 762},
    }
    assert models["small-test-model"]["limits"]["max_input_tokens"] == 50


def test_token_id_arrays_are_decoded_and_usage_counts_the_ids_sent(service, call_api, sim):
    from embedsvc.services.tokens import _cl100k

    encoding = _cl100k()
    hello = encoding.encode_ordinary("hello world")
    # "hello" spelled in two ids: OpenAI counts the ids it is sent, not those of the canonical spelling.
    split = [encoding.encode_single_token(b"hel"), encoding.encode_single_token(b"lo")]
    status, body, _ = call_api({"input": [hello, split], "model": TE3S})
    assert status == 200, body
    assert np.allclose(body["data"][0]["embedding"], hash_vector("hello world", 1536), atol=1e-6)
    assert np.allclose(body["data"][1]["embedding"], hash_vector("hello", 1536), atol=1e-6)
    assert body["usage"]["prompt_tokens"] == len(hello) + 2 == 4
    assert sim.records[0].inputs == 2


def test_one_flat_token_array_is_one_input(service, call_api):
    from embedsvc.services.tokens import _cl100k

    ids = _cl100k().encode_ordinary("In the beginning")
    status, body, _ = call_api({"input": ids, "model": TE3S, "encoding_format": "base64"})
    assert status == 200 and len(body["data"]) == 1
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_token_ids_for_a_model_without_cl100k_are_counted_by_that_model(service, call_api, sim):
    from embedsvc.services.tokens import _cl100k, estimate_tokens

    text = "the decoded words are what this model sees"
    status, body, _ = call_api({"input": [_cl100k().encode_ordinary(text)], "model": "small-test-model"})
    assert status == 200, body
    assert np.allclose(body["data"][0]["embedding"], hash_vector(text, 8), atol=1e-6)
    assert body["usage"]["prompt_tokens"] == estimate_tokens(text)


def test_large_request_is_split_at_the_models_limits(service, call_api, sim):
    # small-test-model: at most 4 inputs and 200 tokens per request.
    texts = [f"text number {i}" for i in range(10)]
    status, body, _ = call_api({"input": texts, "model": "small-test-model"})
    assert status == 200 and len(body["data"]) == 10
    assert [r.inputs for r in sim.records] == [4, 4, 2]
    assert np.allclose(body["data"][9]["embedding"], hash_vector("text number 9", 8), atol=1e-6)


def test_spent_rate_limit_budget_sheds_load_with_429_and_retry_after(aws, sim, emf, monkeypatch, call_api):
    import json

    from embedsvc import container
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder
    from tests.conftest import sim_registry

    # A provider that grants 5 requests a minute; the service may wait only 0.2 s for budget.
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim, rpm=5)))
    monkeypatch.setenv("REALTIME_MAX_WAIT_SECONDS", "0.2")
    reset_settings()
    container.put("costs", CostRecorder(sink=emf.append))
    for i in range(5):
        assert call_api({"input": f"text {i}", "model": TE3S})[0] == 200
    status, body, headers = call_api({"input": "one too many", "model": TE3S})
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    assert sim.calls == 5  # the ledger said no before the provider could


def test_unknown_cost_source_is_a_400_naming_the_allowed_ones(service, call_api, sim):
    status, body, _ = call_api({"input": "hello", "model": TE3S}, headers={"X-Cost-Source": "marketing"})
    assert status == 400
    assert body["error"]["param"] == "X-Cost-Source" and "user_query" in body["error"]["message"]
    assert sim.calls == 0


def test_the_cache_is_scoped_by_tenant(service, sim):
    import json as _json

    from embedsvc.local.gateway import rest_event
    from embedsvc.local.lambda_context import LocalLambdaContext
    from functions.api.app import lambda_handler

    def call_as(tenant: str) -> dict:
        event = rest_event(
            "POST",
            "/v1/embeddings",
            {"Content-Type": "application/json"},
            _json.dumps({"input": "a private note", "model": TE3S}),
            {"principalId": f"user-{tenant}", "tenant_id": tenant, "user_id": f"user-{tenant}"},
        )
        return lambda_handler(event, LocalLambdaContext("api"))

    call_as("tenant-a")
    answer = call_as("tenant-b")  # tenant-b must not learn that tenant-a embedded this text
    assert answer["multiValueHeaders"]["X-Cache-Hits"] == ["0"]
    assert sim.calls == 2
    call_as("tenant-a")
    assert sim.calls == 2  # tenant-a's own repeat is a hit


def test_requests_are_split_below_the_tightest_providers_token_budget(service):
    from embedsvc.services.ratelimit import Lane

    embeddings = service.embedding_service()
    spec = embeddings.registry.model("te3s")
    embeddings.registry.providers["sim"].tpm = 1000
    embeddings.bulk_ceiling = 0.8
    assert embeddings.request_limits(spec, Lane.REALTIME).max_tokens == 1000
    assert embeddings.request_limits(spec, Lane.BULK).max_tokens == 800


def test_insufficient_quota_is_not_waited_out_but_falls_back(service, call_api, sim, sim2):
    sim.inject(Fault(status=429, code="insufficient_quota", message="You exceeded your current quota"))
    status, _, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 200
    assert [r.status for r in sim.records] == [429] and sim2.calls == 1  # no cooldown, no retry at sim


def test_an_endpoint_whose_key_cannot_be_read_is_skipped(aws, sim, sim2, emf, monkeypatch, call_api):
    import json

    from embedsvc import container
    from embedsvc.container import reset_settings
    from embedsvc.observability import CostRecorder
    from tests.conftest import sim_registry

    registry = sim_registry(sim, sim2, api_key_env="UNSET_KEY_VAR", api_key_secret="no/such/secret")
    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(registry))
    reset_settings()
    container.put("costs", CostRecorder(sink=emf.append))
    status, _, _ = call_api({"input": "hello", "model": TE3S})
    assert status == 200
    assert sim.calls == 0 and sim2.calls == 1

"""Shared fixtures: moto-backed AWS, a local OpenAI-compatible provider, and handler invocation helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from embedsvc.config import DEFAULT_REGISTRY
from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.local.provider_sim import ProviderSimulator

TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "CACHE_TABLE": "test-cache",
    "LEDGER_TABLE": "test-ledger",
    "API_KEYS_TABLE": "test-api-keys",
    "STATE_TABLE": "test-state",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_SERVICE_NAME": "embedsvc-test",
    "POWERTOOLS_LOG_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "QDRANT_PATH": "",
    "QDRANT_URL": "",
}


def sim_registry(
    primary: ProviderSimulator, fallback: ProviderSimulator | None = None, **provider_overrides
) -> dict:
    """A registry whose models are served by local simulators (OpenAI-compatible HTTP)."""
    providers = {
        "sim": {
            "key": "sim",
            "kind": "openai",
            "base_url": primary.base_url,
            "api_key_env": "SIM_API_KEY",
            "timeout_seconds": 2.0,
            **provider_overrides,
        },
    }
    te3s_endpoints = [{"provider": "sim", "model_name": "text-embedding-3-small"}]
    if fallback is not None:
        providers["sim2"] = {
            "key": "sim2",
            "kind": "openai",
            "base_url": fallback.base_url,
            "api_key_env": "SIM_API_KEY",
            "timeout_seconds": 2.0,
        }
        te3s_endpoints.append({"provider": "sim2", "model_name": "text-embedding-3-small"})
    return {
        "default_model": "te3s",
        "providers": providers,
        "models": {
            "te3s": {**DEFAULT_REGISTRY["models"]["te3s"], "endpoints": te3s_endpoints},
            "small": {
                "key": "small",
                "name": "small-test-model",
                "dimensions": 8,
                "max_input_tokens": 50,
                "max_inputs_per_request": 4,
                "max_tokens_per_request": 200,
                "price_per_million_tokens": 1.0,
                "tokenizer": "estimate",
                "endpoints": [{"provider": "sim", "model_name": "small-test-model"}],
            },
        },
    }


@pytest.fixture
def env(monkeypatch) -> Iterator[None]:
    """Test credentials and names; never real AWS."""
    for key, value in TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("EMBEDSVC_REGISTRY_FILE", raising=False)
    monkeypatch.setenv("SIM_API_KEY", "sk-sim")
    from embedsvc.container import reset_settings

    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def aws(env) -> Iterator[None]:
    """moto in process, with the tables and queues template.yaml creates."""
    from moto import mock_aws

    with mock_aws():
        from embedsvc.adapters.aws import client
        from embedsvc.adapters.cache import create_cache_table
        from embedsvc.adapters.dead_letters import create_state_table
        from embedsvc.services.auth import create_api_keys_table
        from embedsvc.services.ratelimit import create_ledger_table

        dynamodb = client("dynamodb")
        create_cache_table(dynamodb, TEST_ENV["CACHE_TABLE"])
        create_ledger_table(dynamodb, TEST_ENV["LEDGER_TABLE"])
        create_api_keys_table(dynamodb, TEST_ENV["API_KEYS_TABLE"])
        create_state_table(dynamodb, TEST_ENV["STATE_TABLE"])
        yield
        from embedsvc.container import reset_settings

        reset_settings()


@pytest.fixture
def sim() -> Iterator[ProviderSimulator]:
    with ProviderSimulator(dimensions={"small-test-model": 8}) as server:
        yield server


@pytest.fixture
def sim2() -> Iterator[ProviderSimulator]:
    with ProviderSimulator(dimensions={"small-test-model": 8}) as server:
        yield server


@pytest.fixture
def emf(aws) -> list[dict]:
    """Captures every cost EMF blob the service emits."""
    from embedsvc import container
    from embedsvc.observability import CostRecorder

    blobs: list[dict] = []
    container.put("costs", CostRecorder(sink=blobs.append))
    return blobs


@pytest.fixture
def service(aws, sim, sim2, emf, monkeypatch):
    """The API's dependencies wired to two simulators (sim first, sim2 as fallback for te3s)."""
    from embedsvc.container import reset_settings

    monkeypatch.setenv("EMBEDSVC_REGISTRY", json.dumps(sim_registry(sim, sim2)))
    reset_settings()
    from embedsvc import container
    from embedsvc.observability import CostRecorder

    container.put("costs", CostRecorder(sink=emf.append))
    return container


def api_event(
    body,
    *,
    headers: dict | None = None,
    raw: bool = False,
    path: str = "/v1/embeddings",
    method: str = "POST",
) -> dict:
    from embedsvc.local.gateway import rest_event

    text = body if raw else json.dumps(body)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return rest_event(
        method,
        path,
        all_headers,
        text,
        {"principalId": "user-1", "tenant_id": "tenant-a", "user_id": "user-1"},
    )


@pytest.fixture
def call_api():
    """Invoke the real API handler with a REST proxy event; returns (status, json body, headers)."""
    from functions.api.app import lambda_handler

    def call(body, **kwargs):
        answer = lambda_handler(api_event(body, **kwargs), LocalLambdaContext("api"))
        headers = {k.lower(): v for k, v in (answer.get("headers") or {}).items()}
        for name, values in (answer.get("multiValueHeaders") or {}).items():
            headers[name.lower()] = ", ".join(values)
        return answer["statusCode"], json.loads(answer["body"]), headers

    return call


def load_event(relative: str) -> dict:
    path = os.path.join(os.path.dirname(__file__), "..", "events", relative)
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> Iterator[str]:
    """A fresh database of ours, migrated: on DATABASE_URL, the server at 127.0.0.1:5432, or an embedded one."""
    from embedsvc.adapters.postgres import Database
    from embedsvc.db.migrations import upgrade
    from embedsvc.local.postgres import resolve_local_database

    local = resolve_local_database(tmp_path_factory.mktemp("pg"), name=f"embedsvc_test_{os.getpid()}")
    db = Database.from_url(local.url)
    upgrade(db)
    db.close()
    yield local.url
    local.close()


@pytest.fixture
def content_db(postgres_url, monkeypatch):
    """The test database with empty tables, set as DATABASE_URL for the code under test."""
    from embedsvc.adapters.postgres import Database

    db = Database.from_url(postgres_url)
    with db.connection() as conn:
        conn.run("TRUNCATE content, repair_checkpoints, consistency_gaps")
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    yield db
    db.close()

"""The ledger between the real `openai` SDK and a rate-limited provider, two 'processes' on a moto server."""

from __future__ import annotations

import logging

import boto3
import openai
import pytest
from moto.server import ThreadedMotoServer

from embedsvc.errors import ServiceOverloaded
from embedsvc.local.provider_sim import Fault, ProviderSimulator
from embedsvc.services.ratelimit import (
    Lane,
    LimitSpec,
    RateLimitLedger,
    create_ledger_table,
    item_key,
    parse_item,
)
from embedsvc.services.tokens import estimate_tokens

TABLE = "ratelimit-integration"
MODEL = "text-embedding-3-small"


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    create_ledger_table(dynamodb(url), TABLE)
    yield url
    server.stop()


def dynamodb(url: str):
    """A separate client, as a separate Lambda would hold."""
    return boto3.client(
        "dynamodb",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )


@pytest.fixture
def provider():
    with ProviderSimulator(tpm=10_000, rpm=100, window_seconds=60) as sim:
        yield sim


def test_a_provider_429_makes_every_process_back_off(endpoint, provider):
    limit = LimitSpec(key="sim:throttle", tpm=10_000, rpm=100, window_seconds=60)
    hit, elsewhere = RateLimitLedger(TABLE, dynamodb(endpoint)), RateLimitLedger(TABLE, dynamodb(endpoint))
    client = openai.OpenAI(base_url=provider.base_url, api_key="x", max_retries=0)
    provider.inject(Fault(status=429, headers={"retry-after-ms": "30000", "retry-after": "30"}))
    text = "In the beginning was the Word"
    hit.acquire(limit, estimate_tokens(text), Lane.REALTIME, max_wait_seconds=1)
    with pytest.raises(openai.RateLimitError) as rejected:
        client.embeddings.create(model=MODEL, input=[text])
    hit.report_throttle(limit, float(rejected.value.response.headers["retry-after-ms"]) / 1000)

    with pytest.raises(ServiceOverloaded) as refused:
        elsewhere.acquire(limit, 10, Lane.BULK, max_wait_seconds=5)
    assert 25 < refused.value.retry_after <= 30
    assert provider.calls == 1  # the other process never reached the provider


def test_reconcile_replaces_the_estimate_with_the_providers_usage(endpoint, provider):
    limit = LimitSpec(key="sim:reconcile", tpm=10_000, rpm=100, window_seconds=60)
    ledger = RateLimitLedger(TABLE, dynamodb(endpoint))
    client = openai.OpenAI(base_url=provider.base_url, api_key="x", max_retries=0)
    # 0.25 tokens per byte undercounts Greek badly: cl100k spends a token on almost every letter.
    texts = ["Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν", "For God so loved the world"]
    estimate = sum(estimate_tokens(t) for t in texts)
    reservation = ledger.acquire(limit, estimate, Lane.BULK, max_wait_seconds=1)
    response = client.embeddings.create(model=MODEL, input=texts)
    ledger.reconcile(reservation, response.usage.prompt_tokens)

    assert response.usage.prompt_tokens > estimate
    stored = dynamodb(endpoint).get_item(TableName=TABLE, Key=item_key(limit.key), ConsistentRead=True)[
        "Item"
    ]
    assert int(stored["tokens_total"]["N"]) == response.usage.prompt_tokens == provider.records[-1].tokens
    assert parse_item(stored).slots[reservation.slot][0] == response.usage.prompt_tokens

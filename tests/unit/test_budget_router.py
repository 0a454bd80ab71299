"""The router charges budgets only where a provider bills, and gives a charge back when the call fails."""

from __future__ import annotations

import boto3
import numpy as np
import pytest
from moto import mock_aws

from embedsvc.adapters.providers.base import ProviderResult
from embedsvc.config import Endpoint, ModelSpec, ProviderSpec
from embedsvc.errors import (
    AllProvidersFailed,
    BudgetExceeded,
    LedgerUnavailable,
    ProviderRateLimited,
    ProviderTimeout,
)
from embedsvc.observability import CallContext
from embedsvc.services.budgets import BudgetStore
from embedsvc.services.ratelimit import Lane, RateLimitLedger, create_ledger_table
from embedsvc.services.router import EmbeddingRouter

TABLE = "budget-router-test"
SPECS = {
    "api": ProviderSpec(key="api", kind="openai", base_url="http://127.0.0.1:9", tpm=10**6, rpm=10**4),
    "local": ProviderSpec(key="local", kind="local"),
}


def model(*providers: str) -> ModelSpec:
    return ModelSpec(
        key="m",
        name="m",
        dimensions=4,
        max_input_tokens=1000,
        max_inputs_per_request=16,
        max_tokens_per_request=10_000,
        price_per_million_tokens=0.02,
        tokenizer="cl100k_base",
        endpoints=[Endpoint(provider=p, model_name="m") for p in providers],
    )


class Provider:
    """Answers with zero vectors, or fails the next calls with the errors queued in `failures`."""

    def __init__(self, key: str):
        self.key = key
        self.failures: list[Exception] = []
        self.calls = 0

    def embed(self, texts, model_name, *, dimensions=None, timeout=None):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return ProviderResult(np.zeros((len(texts), 4), dtype=np.float32), prompt_tokens=None)


class BrokenStore:
    def active(self, wanted):
        raise LedgerUnavailable("down")


@pytest.fixture
def setup():
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_ledger_table(client, TABLE)
        store = BudgetStore(TABLE, client)
        ledger = RateLimitLedger(TABLE, client, budgets=store, sleep=lambda s: None)
        providers = {"api": Provider("api"), "local": Provider("local")}
        router = EmbeddingRouter(providers, ledger, provider_specs=SPECS)
        yield store, ledger, providers, router


def test_only_contexts_with_budgets_and_only_metered_models_are_charged(setup):
    store, _, _, router = setup
    store.set("task", "job", tokens=100)
    contexts = [CallContext(task_id="job", tenant_id="acme"), CallContext(tenant_id="acme"), CallContext()]
    assert router.budget_scopes(model("api"), contexts) == [(("task", "job"),), (), ()]
    assert router.budget_scopes(model("local"), contexts) == [(), (), ()]  # the in-process model is free


def test_a_failed_provider_call_gives_its_charge_back(setup):
    store, _, providers, router = setup
    store.set("task", "job", tokens=100)
    providers["api"].failures = [ProviderRateLimited("slow down", retry_after=0.0), ProviderTimeout("late")]
    with pytest.raises(AllProvidersFailed):  # a 429, then a timeout: the one endpoint failed
        router.embed(model("api"), ["hi"], 60, lane=Lane.BULK, max_wait_seconds=1, budgets=(("task", "job"),))
    budget = store.get("task", "job")
    assert budget is not None and budget.spent_tokens == 0 and providers["api"].calls == 2
    router.embed(model("api"), ["hi"], 60, lane=Lane.BULK, max_wait_seconds=1, budgets=(("task", "job"),))
    with pytest.raises(BudgetExceeded):  # 60 of 100 spent: the next 60 would pass it
        router.embed(model("api"), ["hi"], 60, lane=Lane.BULK, max_wait_seconds=1, budgets=(("task", "job"),))
    assert providers["api"].calls == 3


def test_a_budget_lookup_fails_closed_except_where_the_api_may_serve_from_memory(setup):
    _, ledger, providers, router = setup
    ledger.budgets = BrokenStore()
    contexts = [CallContext(task_id="job")]
    with pytest.raises(LedgerUnavailable):
        router.budget_scopes(model("api"), contexts)
    ledger.fallback_share, ledger.fallback_processes = 0.2, 4
    assert router.budget_scopes(model("api"), contexts) == [()]

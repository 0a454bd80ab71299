"""Eight processes spend one task's or one tenant's budget at once (a moto server, the provider simulator).

Each process is what a concurrent Lambda would be: its own ledger, budget store, boto3 client, router and
`openai` SDK client, charging every request to the same task and tenant. The simulator counts tokens up
to 15% off the service's estimate (reconcile corrects every charge), and records every request it
received: the sum of what it counted is what the budget must hold to.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import pytest

from embedsvc.local.provider_sim import ProviderSimulator
from tests.integration.test_ratelimit_processes import WORDS, endpoint, estimate, miscount, spawn_together

__all__ = ["endpoint"]  # the module's moto server fixture, shared

TABLE = "ratelimit-budgets"
MODEL = "estimated-model"
PROCESSES = 8
TASK, TENANT = "reindex-42", "tenant-a"
PRICE = 50.0  # $ per 1M tokens: a small budget in dollars is a few dozen requests
MARGIN = 1.15  # reserved = estimate x margin, at least what the simulator counts


@dataclass(frozen=True)
class Plan:
    endpoint: str
    base_url: str
    bulk: bool
    max_seconds: float = 20.0
    refusals_to_stop: int = 4  # a process stops after this many refusals in a row


def one_process(index: int, plan: Plan, ready, start_at, results) -> None:
    """A Lambda-like process: embed random small requests, charged to the task and the tenant, until refused."""
    import os

    os.environ["POWERTOOLS_LOG_LEVEL"] = "ERROR"
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import boto3

    from embedsvc.adapters.providers.openai_http import OpenAIHttpProvider
    from embedsvc.config import Endpoint, ModelSpec, ProviderSpec
    from embedsvc.errors import BudgetExceeded, ServiceOverloaded
    from embedsvc.services.budgets import BudgetStore
    from embedsvc.services.ratelimit import Lane, RateLimitLedger
    from embedsvc.services.router import EmbeddingRouter

    rng = random.Random(index)
    client = boto3.client(
        "dynamodb",
        endpoint_url=plan.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    ledger = RateLimitLedger(TABLE, client, slots_per_window=30, budgets=BudgetStore(TABLE, client))
    spec = ProviderSpec(
        key="sim", kind="openai", base_url=plan.base_url, api_key_env="SIM_API_KEY", tpm=10**7, rpm=10**5
    )
    model = ModelSpec(
        key="est",
        name=MODEL,
        dimensions=8,
        max_input_tokens=2000,
        max_inputs_per_request=16,
        max_tokens_per_request=2000,
        price_per_million_tokens=PRICE,
        tokenizer="estimate",
        token_estimate_margin=MARGIN,
        endpoints=[Endpoint(provider="sim", model_name=MODEL)],
    )
    provider = OpenAIHttpProvider(spec, api_key="x")
    router = EmbeddingRouter({"sim": provider}, ledger, provider_specs={"sim": spec})
    provider.warm()
    lane = Lane.BULK if plan.bulk else Lane.REALTIME
    ready.wait()
    while start_at.value == 0 or time.time() < start_at.value:
        time.sleep(0.01)
    end = start_at.value + plan.max_seconds
    served = refused = in_a_row = 0
    largest = 0
    while time.time() < end and in_a_row < plan.refusals_to_stop:
        texts = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for _ in range(rng.randint(1, 3))
        ]
        tokens = sum(estimate(t) for t in texts)
        largest = max(largest, model.reservation_tokens(tokens))
        try:
            router.embed(
                model,
                texts,
                tokens,
                lane=lane,
                max_wait_seconds=2.0,
                budgets=(("task", TASK), ("tenant", TENANT)),
            )
            served += 1
            in_a_row = 0
        except BudgetExceeded:
            refused += 1
            in_a_row += 1
        except ServiceOverloaded:
            time.sleep(0.05)
    results.put({"served": served, "refused": refused, "largest_reservation": largest, **ledger.stats()})


def run_processes(endpoint: str, *, task: dict, tenant: dict, bulk: bool) -> tuple[list, list[dict], dict]:
    """Eight processes against fresh budgets; returns (provider records, reports, budget states by scope)."""
    import boto3

    from embedsvc.services.budgets import BudgetState, BudgetStore, budget_pk
    from embedsvc.services.ratelimit import create_ledger_table, item_key

    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    create_ledger_table(client, TABLE)
    client.delete_item(TableName=TABLE, Key=item_key(f"sim:{MODEL}"))
    store = BudgetStore(TABLE, client)
    store.clear("task", TASK)
    store.clear("tenant", TENANT)
    store.set("task", TASK, **task)
    store.set("tenant", TENANT, **tenant)
    with ProviderSimulator(dimensions={MODEL: 8}, token_counter=miscount) as sim:
        reports = spawn_together(one_process, Plan(endpoint=endpoint, base_url=sim.base_url, bulk=bulk))
        records = list(sim.records)
    states = {}
    for scope, key in (("task", TASK), ("tenant", TENANT)):
        item = client.get_item(TableName=TABLE, Key={"pk": {"S": budget_pk(scope, key)}}, ConsistentRead=True)
        states[scope] = BudgetState.parse(item["Item"])
    return records, reports, states


@pytest.mark.slow
@pytest.mark.parametrize(
    ("binding", "task", "tenant", "bulk"),
    [
        ("task", {"tokens": 6_000}, {"usd": 100.0}, True),  # a reindex's lifetime budget, in tokens
        ("tenant", {"tokens": 10**9}, {"usd": 0.3}, False),  # a tenant's month, in dollars
    ],
    ids=["task-tokens", "tenant-dollars"],
)
def test_eight_processes_never_spend_past_a_budget(endpoint, binding, task, tenant, bulk):
    from embedsvc.services.budgets import nano_usd, usd_to_nano

    records, reports, states = run_processes(endpoint, task=task, tenant=tenant, bulk=bulk)
    accepted = [r for r in records if r.status == 200]
    counted = sum(r.tokens for r in accepted)  # what the provider counted (and would bill)
    largest = max(r["largest_reservation"] for r in reports)
    state = states[binding]
    # Every charge was corrected to the provider's own count: the budgets hold exactly what was billed.
    for scope in ("task", "tenant"):
        assert states[scope].spent_tokens == counted
        assert states[scope].spent_nusd == sum(nano_usd(r.tokens, PRICE) for r in accepted)
    if binding == "task":
        limit, spent, step = task["tokens"], state.spent_tokens, largest
    else:
        limit, spent, step = usd_to_nano(tenant["usd"]), state.spent_nusd, nano_usd(largest, PRICE)
    # Reservations never pass the limit; reconcile only refunds here (the margin covers the provider's
    # count), so the spend stays within the limit, well inside "one request's reservation" past it.
    assert spent <= limit
    assert spent > limit - 2 * step  # and the budget was used up, not abandoned early
    assert len(records) == len(accepted)  # nothing the budget refused reached the provider
    refusing = [r for r in reports if r["refused"] > 0]
    assert len(refusing) == PROCESSES  # every process was stopped by the budget
    assert sum(1 for r in reports if r["served"] > 0) >= 2  # and they really spent it concurrently
    assert sum(r["budget_released_grants"] for r in reports) > 0  # refusals that raced past the hint

"""The ledger's operational metrics the dashboard and alarms read: utilization, sheds, provider 429s."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from embedsvc.errors import ServiceOverloaded
from embedsvc.services.ratelimit import Lane, LimitSpec, RateLimitLedger, create_ledger_table
from tests.unit.ledger_fakes import FakeClock, Recorder

TABLE = "ledger-metrics-test"
LIMIT = LimitSpec(key="openai:text-embedding-3-small", tpm=1000, rpm=100, window_seconds=60.0)


@pytest.fixture
def ledger():
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_ledger_table(client, TABLE)
        clock = FakeClock()
        yield RateLimitLedger(TABLE, client, clock=clock, sleep=clock.sleep, metrics=Recorder())


def test_the_peak_share_of_the_window_is_emitted_once_a_minute_per_lane(ledger):
    metrics, clock = ledger.metrics, ledger.clock
    ledger.acquire(LIMIT, 500, Lane.REALTIME, max_wait_seconds=0)
    clock.sleep(10)
    ledger.acquire(LIMIT, 100, Lane.REALTIME, max_wait_seconds=0)  # the window now holds 600 of 1,000
    assert metrics.named("LedgerUtilization") == []  # not before a minute has passed
    clock.sleep(51)
    ledger.acquire(LIMIT, 10, Lane.REALTIME, max_wait_seconds=0)
    assert metrics.named("LedgerUtilization") == [(61.0, {"lane": "realtime"})]  # the minute's peak, in %


def test_a_shed_request_and_a_provider_429_are_counted(ledger):
    metrics = ledger.metrics
    ledger.acquire(LIMIT, 900, Lane.REALTIME, max_wait_seconds=0)
    with pytest.raises(ServiceOverloaded):
        ledger.acquire(LIMIT, 900, Lane.BULK, max_wait_seconds=0)
    ledger.report_throttle(LIMIT, 2.0)
    assert metrics.named("LedgerOverloaded") == [(1, {"lane": "bulk"})]
    assert metrics.named("ProviderThrottles") == [(1, {"limit": LIMIT.key})]

"""The API's cost roll-up is written after the answer has left (embedsvc/post_response.py).

Lambda's Extensions API is played by `LocalExtensionsApi` (its documented contract: register, event/next,
one invocation at a time until every extension has asked for its next event). The handler is the real
`flush_costs` decorator; the last test runs the real API handler and reads the roll-up back.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from embedsvc import post_response
from embedsvc.local.extensions_api import LocalExtensionsApi
from embedsvc.observability import flush_costs
from functions.api.app import lambda_handler  # imported before any test sets AWS_LAMBDA_RUNTIME_API


@pytest.fixture
def runtime(monkeypatch):
    post_response.reset()
    with LocalExtensionsApi(timeout_seconds=10) as api:
        monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", api.address)
        yield api
    post_response.reset()


class SlowFlush:
    """A flush that takes a while and records when it ran, and which can be told to fail."""

    def __init__(self, seconds: float = 0.3, fail: bool = False):
        self.seconds, self.fail = seconds, fail
        self.finished: list[float] = []

    def __call__(self) -> None:
        time.sleep(self.seconds)
        self.finished.append(time.monotonic())
        if self.fail:
            raise RuntimeError("DynamoDB is down")


@flush_costs
def handler(event, context):
    return {"statusCode": 200, "body": "answer"}


def test_the_answer_leaves_before_the_flush_and_the_next_invocation_waits_for_it(runtime):
    # Given the extension registered at init
    flush = SlowFlush()
    flusher = post_response.start(flush)
    assert flusher is not None and flusher.active
    assert runtime.registrations == [{"name": post_response.EXTENSION_NAME, "body": {"events": ["INVOKE"]}}]
    # When an invocation runs
    answer = runtime.invoke(handler, {})
    answered = time.monotonic()
    # Then its answer is back before the roll-up is written
    assert answer["body"] == "answer"
    assert flush.finished == []
    # and the roll-up is written before the environment takes another invocation
    runtime.invoke(handler, {})
    assert len(flush.finished) == 1 and flush.finished[0] > answered
    assert runtime.wait_idle()
    assert len(flush.finished) == 2 and flusher.flushes == 2


def test_without_the_runtime_api_the_handler_flushes_before_it_returns(monkeypatch):
    # Given a process that is not a Lambda runtime (tests, the local gateway, the CLI)
    post_response.reset()
    monkeypatch.delenv("AWS_LAMBDA_RUNTIME_API", raising=False)
    flush = SlowFlush(seconds=0)
    assert post_response.start(flush) is None
    # When a decorated handler runs, Then the container's recorder is flushed inside it
    calls = []
    from embedsvc import container

    class Recorder:
        def flush(self):
            calls.append("flushed")

    container.put("costs", Recorder())
    try:
        handler({}, None)
    finally:
        container.reset()
    assert calls == ["flushed"]
    assert flush.finished == []


def test_a_refused_registration_falls_back_to_flushing_in_the_handler(monkeypatch):
    post_response.reset()
    with LocalExtensionsApi(fail_register=True) as api:
        monkeypatch.setenv("AWS_LAMBDA_RUNTIME_API", api.address)
        assert post_response.start(SlowFlush()) is None
        assert post_response.current() is None
        assert len(api.registrations) == 1


def test_it_can_be_switched_off(runtime, monkeypatch):
    monkeypatch.setenv("COST_FLUSH_AFTER_RESPONSE", "false")
    assert post_response.start(SlowFlush()) is None
    assert runtime.registrations == []


def test_a_failing_flush_still_lets_the_next_invocation_in(runtime):
    flush = SlowFlush(seconds=0, fail=True)
    post_response.start(flush)
    runtime.invoke(handler, {})
    runtime.invoke(handler, {})
    assert runtime.wait_idle()
    assert len(flush.finished) == 2


def test_a_request_never_reported_done_is_flushed_at_its_deadline(runtime):
    # Given a handler that does not go through flush_costs (it never reports done)
    flush = SlowFlush(seconds=0)
    post_response.start(flush)
    started = time.monotonic()
    runtime.invoke(lambda event, context: "undecorated", {}, timeout_seconds=1.5)
    # When Lambda waits for the extension, Then it flushes by the deadline (less the margin) and asks again
    assert runtime.wait_idle(timeout=5)
    assert len(flush.finished) == 1
    assert flush.finished[0] - started < 1.5


def test_the_real_api_writes_its_roll_up_after_answering(runtime, service, monkeypatch):
    # Given the API on moto with a costs table, and the extension registered as its module does at init
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.adapters.cost_store import create_costs_table
    from embedsvc.container import reset_settings
    from embedsvc.local.gateway import rest_event
    from embedsvc.observability import CostRecorder, utc_day

    monkeypatch.setenv("COSTS_TABLE", "post-response-costs")
    create_costs_table(client("dynamodb"), "post-response-costs")
    reset_settings()
    container.put("costs", CostRecorder(sink=lambda blob: None, store=container.cost_store))
    writes: list[str] = []
    answered = threading.Event()

    def flush():
        writes.append("after the answer" if answered.is_set() else "before the answer")
        container.costs().flush()

    post_response.start(flush)
    event = rest_event(
        "POST",
        "/v1/embeddings",
        {"Content-Type": "application/json"},
        json.dumps({"model": "text-embedding-3-small", "input": ["grace and peace to you"]}),
        {"principalId": "t1", "tenant_id": "t1", "user_id": "u1"},
    )
    # When a request is answered
    answer = runtime.invoke(lambda_handler, event)
    answered.set()
    assert answer["statusCode"] == 200
    tokens = json.loads(answer["body"])["usage"]["prompt_tokens"]
    # Then, once the extension is done, the roll-up holds the request's tokens for its user, written once
    assert runtime.wait_idle()
    assert writes == ["after the answer"]
    users = container.cost_store().day_items(utc_day(time.time()), "user")
    assert users["u1"].tokens == tokens
    assert container.costs().pending() == 0


def test_the_api_module_registers_at_import_as_lambda_init_requires(tmp_path):
    # Given a process that looks like a Lambda runtime before its first invocation
    import os
    import subprocess
    import sys

    with LocalExtensionsApi() as api:
        env = {**os.environ, "AWS_LAMBDA_RUNTIME_API": api.address, "POWERTOOLS_TRACE_DISABLED": "true"}
        # When it imports the API handler module (what the runtime does during init)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import functions.api.app as app; print(app.post_response.current() is not None)",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        # Then the extension registered for INVOKE events, with no invocation yet
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == "True"
        assert api.registrations == [{"name": post_response.EXTENSION_NAME, "body": {"events": ["INVOKE"]}}]

"""One correlation id from the API request, through the queue message, to the worker's log lines.

Given the real API, authorizer and worker handlers with their Powertools loggers captured as they format
(the correlation id is a formatter key, not a record attribute), when a caller imports notes with an
X-Correlation-Id, then the index requests on IndexQueue carry it and the worker logs each of them under
it; a request without the header is correlated by API Gateway's request id, returned in the answer; and
no log line holds the notes' text or the API key.
"""

from __future__ import annotations

import contextlib
import json
import logging

import pytest

from embedsvc.local.lambda_context import LocalLambdaContext
from tests.conftest import TEST_ENV, api_event

SECRET = "a private prayer about my brother's debts"
API_KEY = "sk-correlation-test-key-never-logged"
CORRELATION = "corr-import-7f3a"


class Formatted(logging.Handler):
    """Keeps each record as the service's Powertools handler would print it (JSON with correlation_id)."""

    def __init__(self, formatter: logging.Formatter):
        super().__init__(level=logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def logs(service, content_db, monkeypatch):
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.observability import CostRecorder

    sqs = client("sqs")
    monkeypatch.setenv("INDEX_QUEUE_URL", sqs.create_queue(QueueName="corr-index")["QueueUrl"])
    monkeypatch.setenv("INDEX_DLQ_URL", sqs.create_queue(QueueName="corr-dlq")["QueueUrl"])
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["te3s"], "verse": ["te3s"]}))
    container.reset_settings()
    container.put("costs", CostRecorder(sink=lambda blob: None))
    import functions.api.app  # noqa: F401  (its Logger configures the service's handler)

    service_logger = logging.getLogger(TEST_ENV["POWERTOOLS_SERVICE_NAME"])
    powertools = next(h for h in service_logger.handlers if getattr(h, "formatter", None) is not None)
    handler = Formatted(powertools.formatter)
    previous = service_logger.level
    service_logger.setLevel(logging.DEBUG)
    service_logger.addHandler(handler)
    yield handler
    service_logger.removeHandler(handler)
    service_logger.setLevel(previous)


def call(handler, body, **kwargs) -> dict:
    return handler(api_event(body, **kwargs), LocalLambdaContext("api"))


def test_the_request_id_follows_the_work_into_the_worker_and_no_text_or_key_is_logged(logs):
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from functions.api.app import lambda_handler as api
    from functions.authorizer.app import lambda_handler as authorizer
    from functions.embed_worker.app import lambda_handler as worker

    container.api_keys().create(tenant_id="tenant-a", user_id="user-1", key=API_KEY)
    token_event = {
        "type": "TOKEN",
        "authorizationToken": f"Bearer {API_KEY}",
        "methodArn": "arn:aws:execute-api:us-east-1:123456789012:api/local/POST/v1/documents",
    }
    authorizer(token_event, LocalLambdaContext("authorizer"))
    with contextlib.suppress(Exception):  # a wrong key: refused, and logged without the key
        authorizer({**token_event, "authorizationToken": f"Bearer {API_KEY}x"}, LocalLambdaContext("a"))

    # When: an import with the caller's correlation id ...
    documents = [{"id": f"n{i}", "text": f"{SECRET} #{i}", "metadata": {}} for i in range(3)]
    answer = call(
        api,
        {"documents": documents},
        path="/v1/documents/note:import",
        headers={"X-Correlation-Id": CORRELATION},
    )
    assert answer["statusCode"] == 202, answer["body"]
    assert answer["multiValueHeaders"]["X-Correlation-Id"] == [CORRELATION]
    # ... the queued index requests carry it (and no text: they name rows) ...
    sqs, url = client("sqs"), container.settings().index_queue_url
    records = []
    while got := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        for m in got:
            body = json.loads(m["Body"])
            assert body["correlation_id"] == CORRELATION and "text" not in body
            records.append({"messageId": m["MessageId"], "body": m["Body"], "attributes": {}})
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert len(records) == 3
    # ... and the worker logs each message under it, in a batch mixed with another request's message.
    other = json.dumps({"content_type": "memo", "id": "m1", "text": "unrelated", "correlation_id": "other-1"})
    records.append({"messageId": "other", "body": other, "attributes": {}})
    assert worker({"Records": records}, LocalLambdaContext("worker")) == {"batchItemFailures": []}
    processed = [line for line in logs.lines if line.get("message") == "message processed"]
    by_message = {line["message_id"]: line.get("correlation_id") for line in processed}
    assert len(by_message) == 4 and by_message.pop("other") == "other-1"
    assert set(by_message.values()) == {CORRELATION}
    assert all(line["status"] == "done" for line in processed)

    # A request without the header is correlated by API Gateway's request id, echoed in the answer.
    event = api_event({"input": SECRET, "model": "text-embedding-3-small"})
    plain = api(event, LocalLambdaContext("api"))
    assert plain["statusCode"] == 200
    assert plain["multiValueHeaders"]["X-Correlation-Id"] == [event["requestContext"]["requestId"]]
    # A malformed id is not taken (it would be a log-injection vector), the request id is used instead.
    odd = api_event({"input": "x", "model": "text-embedding-3-small"}, headers={"X-Correlation-Id": "a b\nc"})
    assert api(odd, LocalLambdaContext("api"))["multiValueHeaders"]["X-Correlation-Id"] == [
        odd["requestContext"]["requestId"]
    ]

    everything = json.dumps(logs.lines)
    assert processed and CORRELATION in everything  # the capture works
    assert SECRET not in everything and "private prayer" not in everything
    assert API_KEY not in everything


def test_a_repair_run_gets_one_id_that_its_index_requests_carry(logs):
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from functions.repair.app import lambda_handler as repair

    container.content_store().put(
        "verse", "Ps.23.1", text="The LORD is my shepherd", metadata={}, owner_id=None
    )
    repair({}, LocalLambdaContext("repair"))
    finished = [line for line in logs.lines if line.get("message") == "repair finished"]
    (line,) = finished
    run_id = line["correlation_id"]
    assert run_id.startswith("repair-")
    sqs, url = client("sqs"), container.settings().index_queue_url
    (message,) = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert json.loads(message["Body"])["correlation_id"] == run_id

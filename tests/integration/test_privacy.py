"""Nothing secret and no user text reaches logs or traces: ids and hashes only.

Every handler runs through its success and failure paths with DEBUG logging and a recording trace
provider; the test then looks for the request texts, the API key and the vectors' numbers in
everything that was logged or put into a trace.
"""

from __future__ import annotations

import contextlib
import json
import logging

import numpy as np
import pytest

from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.local.provider_sim import Fault, hash_vector
from tests.conftest import TEST_ENV, api_event

SECRET_TEXT = "my private confession about the neighbour's goat"
POISON_TEXT = "a poisoned note that must never be logged"
API_KEY = "sk-privacy-test-key-that-must-not-leak"


class RecordingSubsegment:
    def __init__(self, sink: list):
        self.sink = sink

    def put_metadata(self, key, value, namespace="default"):
        self.sink.append(("metadata", key, value))

    def put_annotation(self, key, value):
        self.sink.append(("annotation", key, value))

    def add_exception(self, exception, stack, remote=False):
        self.sink.append(("exception", repr(exception), stack))


class RecordingProvider:
    """A tracing provider that keeps whatever the handlers would send to X-Ray."""

    def __init__(self):
        self.records: list = []

    @contextlib.contextmanager
    def in_subsegment(self, name=None, **kwargs):
        self.records.append(("subsegment", name, None))
        yield RecordingSubsegment(self.records)

    def put_metadata(self, key, value, namespace="default"):
        self.records.append(("metadata", key, value))

    def put_annotation(self, key, value):
        self.records.append(("annotation", key, value))


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(json.dumps(record.__dict__, default=str))


@pytest.fixture
def observed(monkeypatch):
    """DEBUG logs of the service's loggers, and a recording trace provider on every handler."""
    import functions.api.app as api
    import functions.authorizer.app as authorizer
    import functions.embed_worker.app as worker

    provider = RecordingProvider()
    for module in (api, authorizer, worker):
        monkeypatch.setattr(module.tracer, "provider", provider)
    handler = Captured()
    service_logger = logging.getLogger(TEST_ENV["POWERTOOLS_SERVICE_NAME"])
    previous = service_logger.level
    service_logger.setLevel(logging.DEBUG)
    service_logger.addHandler(handler)
    yield handler, provider
    service_logger.removeHandler(handler)
    service_logger.setLevel(previous)


def leaked(everything: str, vector: np.ndarray) -> list[str]:
    found = [s for s in (SECRET_TEXT, POISON_TEXT, API_KEY, "neighbour", "confession") if s in everything]
    # A vector shows as its coordinates one after the other, however they are formatted.
    for sep in (", ", ","):
        run = sep.join(f"{float(v):.5f}"[:7] for v in vector[:2])
        if run in everything:
            found.append(f"vector coordinates {run}")
    return found


def test_no_text_key_or_vector_in_logs_or_traces(service, sim, sim2, observed, monkeypatch):
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from functions.api.app import lambda_handler as api_handler
    from functions.authorizer.app import lambda_handler as authorizer_handler
    from functions.embed_worker.app import lambda_handler as worker_handler

    handler, provider = observed
    container.api_keys().create(tenant_id="tenant-a", user_id="user-1", key=API_KEY)

    def authorize(token: str) -> None:
        event = {
            "type": "TOKEN",
            "authorizationToken": token,
            "methodArn": "arn:aws:execute-api:us-east-1:123456789012:api/local/POST/v1/embeddings",
        }
        with contextlib.suppress(Exception):  # "Unauthorized" is how an authorizer refuses
            authorizer_handler(event, LocalLambdaContext("authorizer"))

    def api(body: dict) -> dict:
        return api_handler(api_event(body), LocalLambdaContext("api"))

    authorize(f"Bearer {API_KEY}")
    authorize("Bearer sk-wrong-" + API_KEY[::-1])
    ok = api({"input": [SECRET_TEXT], "model": "text-embedding-3-small"})
    assert ok["statusCode"] == 200
    api({"input": [SECRET_TEXT, ""], "model": "text-embedding-3-small"})  # 400
    api({"input": [SECRET_TEXT * 2000], "model": "text-embedding-3-small"})  # over the token limit
    sim.inject(Fault(status=500, message="upstream failed"))
    sim2.inject(Fault(status=502))
    assert api({"input": [SECRET_TEXT + " again"], "model": "text-embedding-3-small"})["statusCode"] == 503
    monkeypatch.setattr(
        container.embedding_service(),
        "embed",
        lambda *a, **k: (_ for _ in ()).throw(ValueError(f"cannot handle {SECRET_TEXT}")),
    )
    assert api({"input": [SECRET_TEXT], "model": "text-embedding-3-small"})["statusCode"] == 500

    dlq = client("sqs").create_queue(QueueName="privacy-dlq")["QueueUrl"]
    monkeypatch.setenv("INDEX_DLQ_URL", dlq)
    monkeypatch.setenv("CONTENT_MODELS", json.dumps({"note": ["te3s"]}))
    container.reset_settings()

    def sqs(message_id: str, body: str) -> dict:
        return {"messageId": message_id, "body": body, "attributes": {}, "eventSource": "aws:sqs"}

    good = json.dumps({"content_type": "note", "id": "n1", "text": SECRET_TEXT})
    poison = json.dumps({"content_type": "note", "id": "n2", "text": POISON_TEXT, "x": 1})
    records = [sqs("good", good), sqs("poison", poison), sqs("broken", "{" + POISON_TEXT)]
    answer = worker_handler({"Records": records}, LocalLambdaContext("worker"))
    assert answer == {"batchItemFailures": []}
    sim.inject(Fault(status=503))
    later = json.dumps({"content_type": "note", "id": "n3", "text": SECRET_TEXT + "!"})
    worker_handler({"Records": [sqs("later", later)]}, LocalLambdaContext("worker"))

    assert handler.lines, "nothing was logged: the capture is broken"
    assert provider.records, "nothing was traced: the capture is broken"
    everything = "\n".join(handler.lines) + "\n" + json.dumps(provider.records, default=str)
    assert leaked(everything, hash_vector(SECRET_TEXT, 1536)) == []
    assert not any(kind == "metadata" and "response" in str(key) for kind, key, _ in provider.records)

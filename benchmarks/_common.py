"""Helpers shared by the benchmarks: import paths, a moto-backed environment, handler calls."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "layers" / "embedsvc", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

BENCH_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "CACHE_TABLE": "bench-cache",
    "LEDGER_TABLE": "bench-ledger",
    "COSTS_TABLE": "bench-costs",
    "API_KEYS_TABLE": "bench-keys",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_LOG_LEVEL": "ERROR",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextmanager
def moto_environment(extra: dict[str, str] | None = None):
    """In-process moto with the service's tables, and the package pointed at them."""
    os.environ.update(BENCH_ENV)
    os.environ.update(extra or {})
    os.environ.pop("AWS_ENDPOINT_URL", None)
    from moto import mock_aws

    from embedsvc.container import reset_settings

    with mock_aws():
        reset_settings()
        from embedsvc.adapters.aws import client
        from embedsvc.adapters.cache import create_cache_table
        from embedsvc.adapters.cost_store import create_costs_table
        from embedsvc.services.ratelimit import create_ledger_table

        create_cache_table(client("dynamodb"), BENCH_ENV["CACHE_TABLE"])
        create_ledger_table(client("dynamodb"), BENCH_ENV["LEDGER_TABLE"])
        create_costs_table(client("dynamodb"), BENCH_ENV["COSTS_TABLE"])
        from embedsvc import container
        from embedsvc.observability import CostRecorder

        # EMF lines would flood stdout; the daily roll-up is written at each invocation's end, as on AWS
        container.put("costs", CostRecorder(sink=lambda blob: None, store=container.cost_store))
        yield container
        reset_settings()


def _serve_moto(conn) -> None:
    """moto in its own process: DynamoDB's work happens off the measured process, as on AWS."""
    import logging

    from moto.server import ThreadedMotoServer

    from embedsvc.local.moto_atomic import serialize_dynamodb_items

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    serialize_dynamodb_items()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send(f"http://{host}:{port}")
    conn.recv()
    server.stop()


@contextmanager
def moto_server_environment(extra: dict[str, str] | None = None):
    """A moto server in another process with the service's tables, and the package pointed at it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve_moto, args=(child,), daemon=True)
    process.start()
    endpoint = parent.recv()
    os.environ.update(BENCH_ENV)
    os.environ.update(extra or {})
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from embedsvc.container import reset_settings

    reset_settings()
    try:
        from embedsvc.adapters.aws import client
        from embedsvc.adapters.cache import create_cache_table
        from embedsvc.adapters.cost_store import create_costs_table
        from embedsvc.services.ratelimit import create_ledger_table

        create_cache_table(client("dynamodb"), BENCH_ENV["CACHE_TABLE"])
        create_ledger_table(client("dynamodb"), BENCH_ENV["LEDGER_TABLE"])
        create_costs_table(client("dynamodb"), BENCH_ENV["COSTS_TABLE"])
        from embedsvc import container
        from embedsvc.observability import CostRecorder

        # EMF lines would flood stdout; the daily roll-up is written at each invocation's end, as on AWS
        container.put("costs", CostRecorder(sink=lambda blob: None, store=container.cost_store))
        yield container
    finally:
        reset_settings()
        os.environ.pop("AWS_ENDPOINT_URL", None)
        parent.send("stop")
        process.join(timeout=10)


def api_call(body: dict, runtime=None) -> dict:
    """One request through the real API handler (as API Gateway would invoke it).

    With `runtime` (a LocalExtensionsApi), it is invoked as Lambda invokes it, extensions included; the
    answer is returned when the handler has it, as Lambda returns it while extensions still run.
    """
    from embedsvc.local.gateway import rest_event
    from embedsvc.local.lambda_context import LocalLambdaContext
    from functions.api.app import lambda_handler

    event = rest_event(
        "POST",
        "/v1/embeddings",
        {"Content-Type": "application/json"},
        json.dumps(body),
        {"principalId": "bench", "tenant_id": "bench", "user_id": "bench"},
    )
    answer = (
        runtime.invoke(lambda_handler, event) if runtime else lambda_handler(event, LocalLambdaContext("api"))
    )
    if answer["statusCode"] != 200:
        raise RuntimeError(answer["body"])
    return json.loads(answer["body"])


def short_texts(n: int, salt: str) -> list[str]:
    """Distinct short sentences (a fresh salt guarantees cache misses)."""
    subjects = [
        "The shepherd",
        "A traveller",
        "The prophet",
        "Her neighbour",
        "The king",
        "A child",
        "The farmer",
        "Our teacher",
    ]
    verbs = ["remembers", "carries", "finds", "praises", "builds", "forgives", "watches", "gathers"]
    objects = [
        "the lost sheep",
        "bread for the road",
        "a quiet river",
        "the old city wall",
        "seeds in spring",
        "a lamp at night",
    ]
    return [
        f"{subjects[i % 8]} {verbs[(i // 8) % 8]} {objects[(i // 64) % 6]} ({salt} {i})." for i in range(n)
    ]


def emit(result: dict) -> None:
    """Benchmarks end with one JSON object on the last line of stdout."""
    print(json.dumps(result), flush=True)

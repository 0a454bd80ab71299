"""2,000 index messages through the worker handler, against the floor of doing the same work directly.

Provider: the local OpenAI-compatible server (zero latency, deterministic vectors). Qdrant: in memory.
DynamoDB (cache, ledger): moto in process. Floor: the same texts sent in provider requests of maximal
size through the same SDK client, and one Qdrant upsert per batch, nothing else.
Targets: overhead_ratio <= 1.5; ledger_calls_per_provider_request <= 2.
"""

from __future__ import annotations

import json
import time

from _common import emit, moto_environment, short_texts

MESSAGES = 2000
BATCH = 100  # the template's BatchSize


def registry(base_url: str) -> dict:
    """The built-in text-embedding-3-small entry, served by the local simulator."""
    from embedsvc.config import DEFAULT_REGISTRY

    te3s = {
        **DEFAULT_REGISTRY["models"]["te3s"],
        "endpoints": [{"provider": "sim", "model_name": "text-embedding-3-small"}],
    }
    return {
        "default_model": "te3s",
        "providers": {
            "sim": {"key": "sim", "kind": "openai", "base_url": base_url, "api_key_env": "SIM_KEY"}
        },
        "models": {"te3s": te3s},
    }


def events(texts: list[str], salt: str) -> list[dict]:
    batches = []
    for start in range(0, len(texts), BATCH):
        records = [
            {
                "messageId": f"{salt}-{start + i}",
                "receiptHandle": "r",
                "body": json.dumps(
                    {
                        "schema_version": 1,
                        "content_type": "bench",
                        "id": f"{salt}-{start + i}",
                        "text": text,
                        "source": "reindex",
                        "task_id": "bench",
                    }
                ),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "eventSource": "aws:sqs",
            }
            for i, text in enumerate(texts[start : start + BATCH])
        ]
        batches.append({"Records": records})
    return batches


def main() -> None:
    import os

    from embedsvc.local.provider_sim import ProviderSimulator

    with ProviderSimulator() as sim:
        os.environ["SIM_KEY"] = "sk-bench"
        with moto_environment(
            {"EMBEDSVC_REGISTRY": json.dumps(registry(sim.base_url)), "QDRANT_PATH": ""}
        ) as container:
            from openai import OpenAI
            from qdrant_client import models

            from embedsvc.adapters.qdrant import point_id
            from embedsvc.local.lambda_context import LocalLambdaContext
            from functions.embed_worker.app import lambda_handler

            context = LocalLambdaContext("worker")
            for event in events(short_texts(BATCH, "warm"), "warm"):  # create the collection, load tiktoken
                lambda_handler(event, context)

            texts = short_texts(MESSAGES, "service")
            ledger = container.ledger()
            before_calls, before_requests = ledger.stats().get("dynamodb_calls", 0), sim.calls
            start = time.perf_counter()
            for event in events(texts, "svc"):
                answer = lambda_handler(event, context)
                assert answer["batchItemFailures"] == [], answer
            container.cache().flush()
            service_seconds = time.perf_counter() - start
            provider_requests = sim.calls - before_requests
            ledger_calls = ledger.stats().get("dynamodb_calls", 0) - before_calls
            assert container.vector_store().count("bench_te3s") == MESSAGES + BATCH

            # The floor: the same provider work in maximal requests, one upsert per batch.
            client = OpenAI(base_url=sim.base_url, api_key="sk-bench", max_retries=0)
            qdrant = container.vector_store().client
            floor_texts = short_texts(MESSAGES, "floor")
            start = time.perf_counter()
            for batch_start in range(0, MESSAGES, BATCH):
                chunk = floor_texts[batch_start : batch_start + BATCH]
                response = client.embeddings.create(model="text-embedding-3-small", input=chunk)
                points = [
                    models.PointStruct(
                        id=point_id("floor", f"f{batch_start + i}"),
                        vector=list(map(float, d.embedding)),
                        payload={"id": f"f{batch_start + i}"},
                    )
                    for i, d in enumerate(response.data)
                ]
                qdrant.upsert("bench_te3s", points=points, wait=True)
            floor_seconds = time.perf_counter() - start

    emit(
        {
            "messages": MESSAGES,
            "service_seconds": round(service_seconds, 4),
            "floor_seconds": round(floor_seconds, 4),
            "overhead_ratio": round(service_seconds / floor_seconds, 4),
            "ledger_calls_per_provider_request": round(ledger_calls / max(provider_requests, 1), 3),
            "provider_requests": provider_requests,
            "targets_met": service_seconds / floor_seconds <= 1.5
            and ledger_calls / max(provider_requests, 1) <= 2,
        }
    )


if __name__ == "__main__":
    main()

"""The API's overhead over calling the provider directly, on the path users take; and cache hit vs miss.

Model: text-embedding-3-small, served by the local OpenAI-compatible simulator in its own process (a
remote provider's work is not on our CPU), with a provider latency (`--latency`, default 0.15 s: what
OpenAI takes for a batch like this one; `--latency 0` measures the bare overhead).

service_seconds: BATCH short texts in one request through the API handler in process, as API Gateway
invokes it: token counting, the embedding cache (DynamoDB, read and written: the write is
awaited before the answer leaves, as it must be in Lambda, whose process freezes after it answers),
the rate-limit ledger (one conditional write), the provider call with the `openai` SDK,
the cost record and the OpenAI-shaped base64 answer. direct_seconds: the same texts sent to the same
simulator with the same SDK, decoded from base64 into numpy as the service does, nothing else. DynamoDB is a moto server in a third process (its work is
not on our CPU, as on AWS). Medians of ROUNDS rounds with fresh texts, order alternating.
cache_hit_p50_ms: a repeated single text (memory tier); miss_p50_ms: a new one, which reads the shared
(DynamoDB) tier and writes it before answering; single_text_overhead_ms: that miss against one direct
call; dynamodb_hit_p50_ms: a hit in a cold container (memory tier empty). Batches over
SHARED_CACHE_MAX_INPUTS (16) use the memory tier only: storing a 6 KB vector costs more than embedding
its text again.
Targets: overhead_ratio <= 1.10 and cache_hit_p50_ms <= 0.1 x miss_p50_ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

from _common import api_call, emit, moto_server_environment, short_texts

MODEL = "text-embedding-3-small"
BATCH = 256
ROUNDS = 7
SAMPLES = 40


def serve_provider(latency: float, conn) -> None:
    """The simulator in its own process, answering until told to stop."""
    from embedsvc.local.provider_sim import ProviderSimulator, sim_tokens

    with ProviderSimulator(latency_seconds=latency) as sim:
        sim_tokens(MODEL, "warm the tokenizer")
        conn.send(sim.base_url)
        conn.recv()


def direct_embed(client, texts: list[str]):
    """The floor: the same request with the same SDK, decoded as efficiently as the service decodes it."""
    import base64

    import numpy as np

    response = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    vectors = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    assert vectors.shape[0] == len(texts)
    return vectors


def registry(base_url: str) -> dict:
    """The built-in text-embedding-3-small entry, served by the simulator."""
    from embedsvc.config import DEFAULT_REGISTRY

    te3s = {**DEFAULT_REGISTRY["models"]["te3s"], "endpoints": [{"provider": "sim", "model_name": MODEL}]}
    return {
        "default_model": "te3s",
        "providers": {
            "sim": {"key": "sim", "kind": "openai", "base_url": base_url, "api_key_env": "SIM_KEY"}
        },
        "models": {"te3s": te3s},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.15, help="provider latency per request, seconds")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    provider = ctx.Process(target=serve_provider, args=(args.latency, child), daemon=True)
    provider.start()
    base_url = parent.recv()
    import os

    os.environ["SIM_KEY"] = "sk-bench"
    try:
        with moto_server_environment({"EMBEDSVC_REGISTRY": json.dumps(registry(base_url))}) as container:
            import openai

            direct_client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
            body = {"model": MODEL, "encoding_format": "base64"}
            api_call({**body, "input": short_texts(BATCH, "warm-api")})  # imports, tables, connections
            direct_embed(direct_client, short_texts(BATCH, "warm-direct"))

            service, direct = [], []
            for round_number in range(ROUNDS):
                texts = short_texts(BATCH, f"round-{round_number}")
                order = ("service", "direct") if round_number % 2 == 0 else ("direct", "service")
                for which in order:
                    start = time.perf_counter()
                    if which == "service":
                        answer = api_call({**body, "input": texts})
                        assert len(answer["data"]) == BATCH
                        service.append(time.perf_counter() - start)
                    else:
                        direct_embed(direct_client, texts)
                        direct.append(time.perf_counter() - start)

            # One query: the shared (DynamoDB) cache tier is read, and written before the answer leaves.
            misses, hits, direct_single = [], [], []
            for i in range(SAMPLES):
                text = short_texts(1, f"latency-{i}")[0]
                start = time.perf_counter()
                api_call({**body, "input": text})
                misses.append(time.perf_counter() - start)
                start = time.perf_counter()
                api_call({**body, "input": text})
                hits.append(time.perf_counter() - start)
                start = time.perf_counter()
                direct_embed(direct_client, short_texts(1, f"direct-{i}"))
                direct_single.append(time.perf_counter() - start)
            # A cold container: the memory tier is empty and DynamoDB answers.
            cache = container.cache()
            dynamodb_hits = []
            for i in range(SAMPLES // 2):
                cache.clear_memory()
                start = time.perf_counter()
                api_call({**body, "input": short_texts(1, f"latency-{i}")[0]})
                dynamodb_hits.append(time.perf_counter() - start)

            ledger = container.ledger().stats()
            container_settings = {"shared_cache_max_inputs": container.settings().shared_cache_max_inputs}
    finally:
        parent.send("stop")
        provider.join(timeout=10)

    service_s, direct_s = statistics.median(service), statistics.median(direct)
    hit_ms, miss_ms = statistics.median(hits) * 1000, statistics.median(misses) * 1000
    emit(
        {
            "model": MODEL,
            "batch": BATCH,
            "provider_latency_s": args.latency,
            "service_seconds": round(service_s, 4),
            "direct_seconds": round(direct_s, 4),
            "overhead_ms": round((service_s - direct_s) * 1000, 1),
            "overhead_ratio": round(service_s / direct_s, 4),
            "cache_hit_p50_ms": round(hit_ms, 3),
            "miss_p50_ms": round(miss_ms, 3),
            "hit_to_miss_ratio": round(hit_ms / miss_ms, 4),
            "dynamodb_hit_p50_ms": round(statistics.median(dynamodb_hits) * 1000, 3),
            "single_text_overhead_ms": round((miss_ms / 1000 - statistics.median(direct_single)) * 1000, 1),
            "shared_cache_max_inputs": container_settings["shared_cache_max_inputs"],
            "ledger_grants": ledger["grants"],
            "ledger_dynamodb_calls": ledger["dynamodb_calls"],
            "targets_met": service_s / direct_s <= 1.10 and hit_ms <= 0.1 * miss_ms,
        }
    )


if __name__ == "__main__":
    main()

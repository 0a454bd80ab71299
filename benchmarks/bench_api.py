"""The API's overhead over calling the provider directly, on the path users take; and cache hit vs miss.

Model: text-embedding-3-small, served by the local OpenAI-compatible simulator in its own process (a
remote provider's work is not on our CPU), with a provider latency (`--latency`, default 0.15 s: what
OpenAI takes for a batch like this one; `--latency 0` measures the bare overhead).

service_seconds: BATCH short texts in one request through the API handler in process, invoked as Lambda
invokes it (through `LocalExtensionsApi`, so the post-response extension runs as on AWS): token counting,
the embedding cache (DynamoDB, read and written: the write is awaited before the answer leaves, as it
must be in Lambda), the rate-limit ledger (one conditional write), the provider call with the `openai`
SDK, and the OpenAI-shaped base64 answer. The cost roll-up (one DynamoDB UpdateItem per dimension) is
written by the extension after the answer has left, before this environment takes its next request:
timed apart as post_response_ms (billed, not waited for by the caller; see embedsvc/post_response.py).
direct_seconds: the same texts sent to the same simulator with the same SDK, decoded from base64 into
numpy as the service does, nothing else. DynamoDB is a moto server in a third process (its work is not
on our CPU, as on AWS). Medians of ROUNDS rounds with fresh texts, order alternating.
cache_hit_p50_ms: a repeated single text (memory tier); miss_p50_ms: a new one, which reads the shared
(DynamoDB) tier and writes it before answering; single_text_overhead_ms: that miss against one direct
call; dynamodb_hit_p50_ms: a hit in a cold container (memory tier empty). Batches over
SHARED_CACHE_MAX_INPUTS (16) use the memory tier only: storing a 6 KB vector costs more than embedding
its text again. `--flush-in-handler` writes the roll-up inside the handler instead (what happens where
the extension cannot register), to show what the extension saves.
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


def container_post_response() -> bool:
    from embedsvc import post_response

    return post_response.current() is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.15, help="provider latency per request, seconds")
    parser.add_argument(
        "--flush-in-handler",
        action="store_true",
        help="write the cost roll-up inside the handler (no post-response extension), as without Lambda's",
    )
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    provider = ctx.Process(target=serve_provider, args=(args.latency, child), daemon=True)
    provider.start()
    base_url = parent.recv()
    import os

    from embedsvc.local.extensions_api import LocalExtensionsApi

    os.environ["SIM_KEY"] = "sk-bench"
    runtime = LocalExtensionsApi().__enter__()
    if args.flush_in_handler:
        os.environ["COST_FLUSH_AFTER_RESPONSE"] = "false"
    # Set before functions.api.app is imported: its init registers the extension, as in Lambda.
    os.environ["AWS_LAMBDA_RUNTIME_API"] = runtime.address
    post_response: list[float] = []

    def api(request: dict) -> tuple[dict, float]:
        """One invocation: its answer and the seconds until the answer; the extension's work after it apart."""
        if not runtime.wait_idle():  # the environment takes a request only once the last one is done
            raise RuntimeError("the post-response extension never finished")
        start = time.perf_counter()
        answer = api_call(request, runtime)
        answered = time.perf_counter()
        if not runtime.wait_idle():
            raise RuntimeError("the post-response extension never finished")
        post_response.append(time.perf_counter() - answered)
        return answer, answered - start

    try:
        with moto_server_environment({"EMBEDSVC_REGISTRY": json.dumps(registry(base_url))}) as container:
            import openai

            direct_client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
            body = {"model": MODEL, "encoding_format": "base64"}
            api({**body, "input": short_texts(BATCH, "warm-api")})  # imports, tables, connections
            direct_embed(direct_client, short_texts(BATCH, "warm-direct"))
            post_response.clear()

            service, direct = [], []
            for round_number in range(ROUNDS):
                texts = short_texts(BATCH, f"round-{round_number}")
                order = ("service", "direct") if round_number % 2 == 0 else ("direct", "service")
                for which in order:
                    if which == "service":
                        answer, seconds = api({**body, "input": texts})
                        assert len(answer["data"]) == BATCH
                        service.append(seconds)
                    else:
                        start = time.perf_counter()
                        direct_embed(direct_client, texts)
                        direct.append(time.perf_counter() - start)
            batch_post_response = list(post_response)

            # One query: the shared (DynamoDB) cache tier is read, and written before the answer leaves.
            misses, hits, direct_single = [], [], []
            for i in range(SAMPLES):
                text = short_texts(1, f"latency-{i}")[0]
                misses.append(api({**body, "input": text})[1])
                hits.append(api({**body, "input": text})[1])
                start = time.perf_counter()
                direct_embed(direct_client, short_texts(1, f"direct-{i}"))
                direct_single.append(time.perf_counter() - start)
            # A cold container: the memory tier is empty and DynamoDB answers.
            cache = container.cache()
            dynamodb_hits = []
            for i in range(SAMPLES // 2):
                cache.clear_memory()
                dynamodb_hits.append(api({**body, "input": short_texts(1, f"latency-{i}")[0]})[1])

            ledger = container.ledger().stats()
            container_settings = {"shared_cache_max_inputs": container.settings().shared_cache_max_inputs}
            # Proof that the roll-up was written (by the extension, or in the handler with --flush-in-handler)
            from embedsvc.observability import utc_day

            by_source = container.cost_store().day_items(utc_day(time.time()), "source")
            rollup_tokens = sum(item.tokens for item in by_source.values())
            extension = (
                "registered" if container_post_response() else "not registered (flushed in the handler)"
            )
    finally:
        parent.send("stop")
        provider.join(timeout=10)
        runtime.__exit__(None, None, None)

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
            "post_response_ms": round(statistics.median(batch_post_response) * 1000, 1),
            "post_response_extension": extension,
            "rollup_tokens_written": rollup_tokens,
            "shared_cache_max_inputs": container_settings["shared_cache_max_inputs"],
            "ledger_grants": ledger["grants"],
            "ledger_dynamodb_calls": ledger["dynamodb_calls"],
            "targets_met": service_s / direct_s <= 1.10 and hit_ms <= 0.1 * miss_ms,
        }
    )


if __name__ == "__main__":
    main()

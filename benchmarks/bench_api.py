"""API overhead against calling the local model directly, and cache-hit vs miss latency.

service_seconds: 256 short texts in one request through the API handler in process (cache miss,
local model, moto DynamoDB for cache and ledger). direct_seconds: the same texts through the model
directly. Each is the median of several rounds with fresh texts, alternating order.
cache_hit_p50_ms is a warm container (memory tier); dynamodb_hit_p50_ms a cold one (moto DynamoDB tier).
Targets: overhead_ratio <= 1.10 and cache_hit_p50_ms <= 0.1 x miss_p50_ms.
"""

from __future__ import annotations

import statistics
import time

from _common import api_call, emit, moto_environment, short_texts

BATCH = 256
ROUNDS = 5
SAMPLES = 60


def main() -> None:
    with moto_environment() as container_ref:
        from embedsvc.adapters.providers.local_model import load_model

        model = load_model()
        api_call(
            {"input": short_texts(BATCH, "warm-api"), "model": "all-MiniLM-L6-v2"}
        )  # load tokenizer, tables
        model.encode(short_texts(BATCH, "warm-direct"), batch_size=64, normalize_embeddings=True)

        service, direct = [], []
        for round_number in range(ROUNDS):
            texts = short_texts(BATCH, f"round-{round_number}")
            order = ("service", "direct") if round_number % 2 == 0 else ("direct", "service")
            for which in order:
                start = time.perf_counter()
                if which == "service":
                    body = api_call({"input": texts, "model": "all-MiniLM-L6-v2"})
                    assert len(body["data"]) == BATCH
                    service.append(time.perf_counter() - start)
                else:
                    model.encode(
                        texts,
                        batch_size=64,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                    direct.append(time.perf_counter() - start)

        misses, hits = [], []
        for i in range(SAMPLES):
            text = short_texts(1, f"latency-{i}")[0]
            start = time.perf_counter()
            api_call({"input": text, "model": "all-MiniLM-L6-v2"})
            misses.append(time.perf_counter() - start)
            start = time.perf_counter()
            api_call({"input": text, "model": "all-MiniLM-L6-v2"})
            hits.append(time.perf_counter() - start)

        # The shared tier alone: a cold container whose memory tier is empty, DynamoDB (moto) answers.
        cache = container_ref.cache()
        cache.flush()
        dynamodb_hits = []
        for i in range(SAMPLES // 2):
            text = short_texts(1, f"latency-{i}")[0]
            cache.clear_memory()
            start = time.perf_counter()
            api_call({"input": text, "model": "all-MiniLM-L6-v2"})
            dynamodb_hits.append(time.perf_counter() - start)

        service_s, direct_s = statistics.median(service), statistics.median(direct)
        hit_ms, miss_ms = statistics.median(hits) * 1000, statistics.median(misses) * 1000
        emit(
            {
                "batch": BATCH,
                "service_seconds": round(service_s, 4),
                "direct_seconds": round(direct_s, 4),
                "overhead_ratio": round(service_s / direct_s, 4),
                "cache_hit_p50_ms": round(hit_ms, 3),
                "miss_p50_ms": round(miss_ms, 3),
                "hit_to_miss_ratio": round(hit_ms / miss_ms, 4),
                "dynamodb_hit_p50_ms": round(statistics.median(dynamodb_hits) * 1000, 3),
                "targets_met": service_s / direct_s <= 1.10 and hit_ms <= 0.1 * miss_ms,
            }
        )


if __name__ == "__main__":
    main()

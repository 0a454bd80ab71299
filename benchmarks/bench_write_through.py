"""Write-through saves: a PUT's latency against the floor max(content commit, embed) + vector upsert.

Model: text-embedding-3-small, served by the local OpenAI-compatible simulator in its own process with a
provider latency (`--latency`, default 0.15 s). Each PUT goes through the real API handler as API Gateway
invokes it: validation, the content commit in Postgres (pg8000), the embedding on a thread meanwhile
(ledger on a moto server in another process, the `openai` SDK), then the conditional vector upsert in
Qdrant (memory mode) and the answer. The floor is measured directly on the same components, for each
save: the same commit (store.put), the same embedding call (the SDK to the same simulator) and the same
upsert, timed separately and combined as max(commit, embed) + upsert: what a save costs when the commit
and the embedding really overlap and nothing else is done. PUTs and floors alternate.
Target: ratio = p50_ms / floor_p50_ms <= 1.3. serial_floor_p50_ms (commit + embed + upsert) is printed
beside it: with a commit much faster than the embedding, the two floors are close.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, moto_server_environment, short_texts
from bench_api import MODEL, direct_embed, registry, serve_provider

AUTH = {"principalId": "bench", "tenant_id": "bench", "user_id": "bench"}


def put(content_id: str, text: str) -> dict:
    from embedsvc.local.gateway import rest_event
    from embedsvc.local.lambda_context import LocalLambdaContext
    from functions.api.app import lambda_handler

    event = rest_event(
        "PUT",
        f"/v1/documents/verse/{content_id}",
        {"Content-Type": "application/json"},
        json.dumps({"text": text, "metadata": {"book": "Bench"}}),
        AUTH,
    )
    answer = lambda_handler(event, LocalLambdaContext("api"))
    if answer["statusCode"] != 200:
        raise RuntimeError(answer["body"])
    return json.loads(answer["body"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.15, help="provider latency per request, seconds")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    provider = ctx.Process(target=serve_provider, args=(args.latency, child), daemon=True)
    provider.start()
    base_url = parent.recv()
    os.environ["SIM_KEY"] = "sk-bench"
    from embedsvc.adapters.postgres import Database
    from embedsvc.db.migrations import upgrade
    from embedsvc.local.postgres import resolve_local_database

    workdir = Path(tempfile.mkdtemp(prefix="bench-wt-"))
    database = resolve_local_database(
        workdir, env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    )
    db = Database.from_url(database.url)
    upgrade(db)
    db.close()
    env = {
        "EMBEDSVC_REGISTRY": json.dumps(registry(base_url)),
        "CONTENT_MODELS": json.dumps({"verse": ["te3s"]}),
        "DATABASE_URL": database.url,
        "QDRANT_PATH": "",
        "QDRANT_URL": "",
    }
    try:
        with moto_server_environment(env) as container:
            import openai

            from embedsvc.adapters.qdrant import Point
            from embedsvc.services.index_points import live_payload

            direct_client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
            store, vectors = container.content_store(), container.vector_store()
            put("warm", "warm the handler, the pool and the collection")
            direct_embed(direct_client, ["warm the direct client"])
            texts = short_texts(args.saves * 2, "write-through")
            service_ms, floor_ms, serial_ms = [], [], []
            parts: dict[str, list[float]] = {"commit": [], "embed": [], "upsert": []}
            indexed = 0
            for i in range(args.saves):
                start = time.perf_counter()
                answer = put(f"s{i}", texts[2 * i])
                service_ms.append((time.perf_counter() - start) * 1000)
                indexed += answer["indexing"] == "indexed"

                start = time.perf_counter()
                row = store.put(
                    "verse", f"f{i}", text=texts[2 * i + 1], metadata={"book": "Bench"}, owner_id=None
                )
                commit = time.perf_counter() - start
                start = time.perf_counter()
                vector = direct_embed(direct_client, [texts[2 * i + 1]])[0]
                embed = time.perf_counter() - start
                start = time.perf_counter()
                vectors.upsert_if_newer(
                    "verse_te3s", [Point(row.point_id, vector, live_payload(row, "te3s", 0))]
                )
                upsert = time.perf_counter() - start
                floor_ms.append((max(commit, embed) + upsert) * 1000)
                serial_ms.append((commit + embed + upsert) * 1000)
                for name, value in (("commit", commit), ("embed", embed), ("upsert", upsert)):
                    parts[name].append(value * 1000)
    finally:
        parent.send("stop")
        provider.join(timeout=10)
        database.close()

    p50, floor = statistics.median(service_ms), statistics.median(floor_ms)
    emit(
        {
            "model": MODEL,
            "saves": args.saves,
            "provider_latency_s": args.latency,
            "indexed": indexed,
            "p50_ms": round(p50, 2),
            "p95_ms": round(statistics.quantiles(service_ms, n=20)[-1], 2),
            "floor_p50_ms": round(floor, 2),
            "floor_parts_p50_ms": {k: round(statistics.median(v), 2) for k, v in parts.items()},
            # What a save would cost with the commit and the embedding one after the other: with a local
            # Postgres committing in ~2 ms the two floors are close, so the ratio cannot show the overlap;
            # tests/unit/test_documents_parallel.py proves it without a clock.
            "serial_floor_p50_ms": round(statistics.median(serial_ms), 2),
            "ratio": round(p50 / floor, 4),
            "targets_met": p50 / floor <= 1.3 and indexed == args.saves,
        }
    )


if __name__ == "__main__":
    main()

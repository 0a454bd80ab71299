"""Benchmark: the shared rate-limit ledger against a rate-limited OpenAI-compatible provider.

Eight bulk workers (separate processes, each with its own ledger and boto3 client, like concurrent
Lambdas) drain a backlog through the real `openai` SDK, reserving in a shared DynamoDB (moto server)
before every call. Phase 1 is bulk only; phase 2 adds a steady realtime stream on top. The provider
simulator enforces TPM and RPM over a sliding window scaled down to a few seconds.

Prints one JSON object as its last line:
  workers, bulk_utilization, http_429, max_window_fraction, realtime_p99_wait_ms (+ context fields).

Run: .venv/bin/python benchmarks/bench_ratelimit.py [--window 10 --tpm 60000 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing as mp
import queue
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "layers" / "embedsvc"))  # run without installing the package

MODEL = "text-embedding-3-small"
TABLE = "bench-ratelimit"
REGION = "us-east-1"
VOCABULARY = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into them than can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three grace faith covenant mercy"
)
WORDS = VOCABULARY.split()


@dataclass(frozen=True)
class Config:
    endpoint: str
    base_url: str
    window: float
    tpm: int
    rpm: int
    slots: int
    phase1: float
    phase2: float
    bulk_texts: int
    bulk_words: int
    realtime_rate: float
    realtime_threads: int


def dynamodb_client(endpoint: str):
    """A boto3 DynamoDB client for the shared moto server."""
    import boto3

    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )


def token_counter():
    """The service's own exact counter for the model (cl100k), as the worker uses it."""
    from embedsvc.config import Endpoint, ModelSpec
    from embedsvc.services.tokens import count_tokens

    spec = ModelSpec(
        key="te3s",
        name=MODEL,
        dimensions=1536,
        supports_dimensions=True,
        max_input_tokens=8192,
        max_inputs_per_request=2048,
        max_tokens_per_request=300_000,
        price_per_million_tokens=0.02,
        tokenizer="cl100k_base",
        endpoints=[Endpoint(provider="openai", model_name=MODEL)],
    )
    return lambda texts: sum(count_tokens(spec, texts))


def retry_after_seconds(exc) -> float:
    """Retry-After from a 429, preferring the millisecond header, as the SDK does."""
    headers = exc.response.headers
    if headers.get("retry-after-ms"):
        return float(headers["retry-after-ms"]) / 1000
    return float(headers.get("retry-after") or 1.0)


def provider_process(tpm: int, rpm: int, window: float, latency: float, conn) -> None:
    """The provider in its own process, so its clock readings do not queue behind moto for the GIL."""
    from embedsvc.local.provider_sim import ProviderSimulator, sim_tokens

    with ProviderSimulator(tpm=tpm, rpm=rpm, window_seconds=window, latency_seconds=latency) as sim:
        sim_tokens(MODEL, "warm the simulator's tokenizer")
        conn.send(sim.base_url)
        conn.recv()  # stop
        conn.send([asdict(r) for r in sim.records])


def warm_up(ledger, client, count) -> None:
    """Pay the cold-start costs (imports, connections, tokenizer) before the clock starts, as a warm Lambda has."""
    import openai

    count(["warm the tokenizer"])
    ledger.client.get_item(TableName=TABLE, Key={"pk": {"S": "warm-up"}})
    with contextlib.suppress(openai.NotFoundError):  # the simulator answers 404 without counting it
        client.post("/warm-up", body={}, cast_to=object)


def bulk_worker(index: int, cfg: Config, barrier, start_value, results) -> None:
    """One bulk worker process: reserve, call the provider, reconcile, until the run ends."""
    import openai

    from embedsvc.errors import LedgerUnavailable, ServiceOverloaded
    from embedsvc.services.ratelimit import Lane, LimitSpec, RateLimitLedger

    limit = LimitSpec(key=f"openai:{MODEL}", tpm=cfg.tpm, rpm=cfg.rpm, window_seconds=cfg.window)
    ledger = RateLimitLedger(TABLE, dynamodb_client(cfg.endpoint), slots_per_window=cfg.slots)
    client = openai.OpenAI(base_url=cfg.base_url, api_key="x", max_retries=0)
    count = token_counter()
    rng = random.Random(index)
    warm_up(ledger, client, count)
    barrier.wait()  # everyone is warm
    barrier.wait()  # the start time is set
    start = start_value.value
    end = start + cfg.phase1 + cfg.phase2
    time.sleep(max(start - time.time(), 0))
    calls = throttled = overloaded = unavailable = 0
    texts: list[str] | None = None
    grants: list[tuple[float, float, int]] = []
    while time.time() < end:
        if texts is None:
            texts = [
                " ".join(
                    rng.choice(WORDS) for _ in range(rng.randint(cfg.bulk_words - 20, cfg.bulk_words + 20))
                )
                for _ in range(cfg.bulk_texts)
            ]
        try:
            reservation = ledger.acquire(limit, count(texts), Lane.BULK, max_wait_seconds=60)
        except ServiceOverloaded:
            overloaded += 1
            continue
        except LedgerUnavailable:
            unavailable += 1
            time.sleep(1)
            continue
        calls += 1
        grants.append((reservation.granted_at, time.time(), reservation.tokens))
        try:
            response = client.embeddings.create(model=MODEL, input=texts)
        except openai.RateLimitError as exc:
            throttled += 1
            ledger.report_throttle(limit, retry_after_seconds(exc))
            ledger.reconcile(reservation, 0)  # the provider did not count the rejected tokens
            continue
        ledger.reconcile(reservation, response.usage.prompt_tokens)
        texts = None
    results.put(
        {
            "role": "bulk",
            "calls": calls,
            "throttled": throttled,
            "overloaded": overloaded,
            "unavailable": unavailable,
            "ledger": ledger.stats(),
            "grants": grants,
        }
    )


def realtime_stream(cfg: Config, barrier, start_value, results) -> None:
    """Phase 2's users: small requests at a steady rate, each served by one of a few API 'Lambdas'."""
    import openai

    from embedsvc.errors import ServiceOverloaded
    from embedsvc.services.ratelimit import Lane, LimitSpec, RateLimitLedger

    limit = LimitSpec(key=f"openai:{MODEL}", tpm=cfg.tpm, rpm=cfg.rpm, window_seconds=cfg.window)
    count = token_counter()
    ready = threading.Semaphore(0)
    jobs: queue.Queue[str | None] = queue.Queue()
    timeline: list[tuple[float, float, float]] = []  # (asked at, acquire took, of which deciding)
    outcome = {"throttled": 0, "overloaded": 0, "calls": 0}
    ledgers: list = []
    lock = threading.Lock()

    def serve() -> None:
        ledger = RateLimitLedger(TABLE, dynamodb_client(cfg.endpoint), slots_per_window=cfg.slots)
        client = openai.OpenAI(base_url=cfg.base_url, api_key="x", max_retries=0)
        warm_up(ledger, client, count)
        with lock:
            ledgers.append(ledger)
            ready.release()
        while (text := jobs.get()) is not None:
            started = time.time()
            try:
                reservation = ledger.acquire(limit, count([text]), Lane.REALTIME, max_wait_seconds=5)
            except ServiceOverloaded:
                with lock:
                    outcome["overloaded"] += 1
                continue
            with lock:
                timeline.append((started, time.time() - started, reservation.waited_seconds))
                outcome["calls"] += 1
            try:
                response = client.embeddings.create(model=MODEL, input=[text])
            except openai.RateLimitError as exc:
                with lock:
                    outcome["throttled"] += 1
                ledger.report_throttle(limit, retry_after_seconds(exc))
                ledger.reconcile(reservation, 0)
                continue
            ledger.reconcile(reservation, response.usage.prompt_tokens)

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(cfg.realtime_threads)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    rng = random.Random(1234)
    barrier.wait()
    barrier.wait()
    begin = start_value.value + cfg.phase1
    end = begin + cfg.phase2 - 1.0
    sent = 0
    while (at := begin + sent / cfg.realtime_rate) < end:
        time.sleep(max(at - time.time(), 0))
        jobs.put(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))))
        sent += 1
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    merged: dict[str, float] = {}
    for ledger in ledgers:
        for name, value in ledger.stats().items():
            merged[name] = merged.get(name, 0) + value
    results.put({"role": "realtime", "sent": sent, "timeline": timeline, **outcome, "ledger": merged})


def max_window_tokens(records, window: float) -> tuple[int, int]:
    """The most tokens and requests the provider accepted in any window ending at an accepted request."""
    most_tokens = most_requests = 0
    left = 0
    in_window = 0
    for right, record in enumerate(records):
        in_window += record.tokens
        # The provider's window is (T - W, T]: a request exactly W earlier no longer counts.
        while records[left].at <= record.at - window:
            in_window -= records[left].tokens
            left += 1
        most_tokens = max(most_tokens, in_window)
        most_requests = max(most_requests, right - left + 1)
    return most_tokens, most_requests


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of seconds, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)] * 1000, 1)


def main() -> None:
    """Run both phases and print the summary as the last line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--tpm", type=int, default=60_000)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--slots", type=int, default=60)
    parser.add_argument("--phase1", type=float, default=61.0)
    parser.add_argument("--phase2", type=float, default=40.0)
    parser.add_argument("--latency", type=float, default=0.05, help="provider latency per request, seconds")
    parser.add_argument("--bulk-texts", type=int, default=8)
    parser.add_argument("--bulk-words", type=int, default=250, help="about one cl100k token per word")
    parser.add_argument("--realtime-rate", type=float, default=5.0, help="realtime requests per second")
    parser.add_argument("--realtime-threads", type=int, default=4)
    parser.add_argument("--dump", help="write provider records and ledger grants to this JSON file")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto server's per-request log lines

    from moto.server import ThreadedMotoServer

    from embedsvc.local.moto_atomic import serialize_dynamodb_items
    from embedsvc.local.provider_sim import RequestRecord
    from embedsvc.services.ratelimit import create_ledger_table

    serialize_dynamodb_items()  # DynamoDB is atomic per item; moto's server threads are not
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    create_ledger_table(dynamodb_client(endpoint), TABLE)

    ctx = mp.get_context("spawn")  # the parent runs server threads: forking them is unsafe
    provider_conn, child_conn = ctx.Pipe()
    provider = ctx.Process(
        target=provider_process, args=(args.tpm, args.rpm, args.window, args.latency, child_conn), daemon=True
    )
    provider.start()
    base_url = provider_conn.recv()
    cfg = Config(
        endpoint=endpoint,
        base_url=base_url,
        window=args.window,
        tpm=args.tpm,
        rpm=args.rpm,
        slots=args.slots,
        phase1=args.phase1,
        phase2=args.phase2,
        bulk_texts=args.bulk_texts,
        bulk_words=args.bulk_words,
        realtime_rate=args.realtime_rate,
        realtime_threads=args.realtime_threads,
    )
    barrier = ctx.Barrier(args.workers + 2, timeout=120)
    start_value = ctx.Value("d", 0.0)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=bulk_worker, args=(i, cfg, barrier, start_value, results))
        for i in range(args.workers)
    ]
    processes.append(ctx.Process(target=realtime_stream, args=(cfg, barrier, start_value, results)))
    for process in processes:
        process.start()
    barrier.wait()
    start_value.value = start = time.time() + 0.5
    barrier.wait()
    phase2_start = start + args.phase1
    reports = [results.get(timeout=args.phase1 + args.phase2 + 180) for _ in processes]
    for process in processes:
        process.join()
    provider_conn.send("stop")
    records = [RequestRecord(**r) for r in provider_conn.recv()]
    provider.join()
    server.stop()

    accepted = sorted((r for r in records if r.status == 200), key=lambda r: r.at)
    phase1 = [r for r in accepted if r.at < phase2_start]
    # Bulk utilization, steady state: the first window after the first grant is an initial burst (the
    # empty window admits a whole budget at once), so measurement starts one window after the first
    # accepted request and covers the whole windows that fit before phase 2 begins. Those k windows
    # are disjoint provider windows, each admitting at most tpm tokens, so the figure cannot exceed 1.
    measure_from = phase1[0].at + args.window
    whole_windows = math.floor((phase2_start - measure_from) / args.window)
    measure_to = measure_from + whole_windows * args.window
    measured = sum(r.tokens for r in phase1 if measure_from < r.at <= measure_to)
    bulk_utilization = measured / (args.tpm * whole_windows) if whole_windows > 0 else 0.0
    # With the burst window included, for comparison (same construction, one window earlier).
    burst_from = phase1[0].at - 1e-6
    burst_to = burst_from + (whole_windows + 1) * args.window
    with_burst = sum(r.tokens for r in phase1 if burst_from < r.at <= burst_to) / (
        args.tpm * (whole_windows + 1)
    )

    most_tokens, most_requests = max_window_tokens(accepted, args.window)
    realtime = next(r for r in reports if r["role"] == "realtime")
    waits = [took for _, took, _ in realtime["timeline"]]  # the whole acquire, DynamoDB round trips included
    bulk = [r for r in reports if r["role"] == "bulk"]
    ledger_totals: dict[str, float] = {}
    for report in [*bulk, realtime]:
        for name, value in report["ledger"].items():
            ledger_totals[name] = ledger_totals.get(name, 0) + value
    grants = ledger_totals.get("grants", 0) or 1
    phase2_bulk_tokens = sum(r.tokens for r in accepted if r.at >= phase2_start and r.inputs > 1)
    phase2_seconds = (accepted[-1].at - phase2_start) if accepted else 0
    summary = {
        "workers": args.workers,
        "bulk_utilization": round(bulk_utilization, 4),
        "http_429": sum(1 for r in records if r.status == 429),
        "max_window_fraction": round(most_tokens / args.tpm, 4),
        "realtime_p99_wait_ms": percentile_ms(waits, 99),
        "bulk_utilization_with_burst_window": round(with_burst, 4),
        "measured_windows": whole_windows,
        "max_window_request_fraction": round(most_requests / args.rpm, 4),
        "realtime_requests": realtime["sent"],
        "realtime_served": realtime["calls"],
        "realtime_overloaded": realtime["overloaded"],
        "realtime_p50_wait_ms": percentile_ms(waits, 50),
        "realtime_max_wait_ms": percentile_ms(waits, 100),
        "realtime_ledger_sleeps": realtime["ledger"].get("waits", 0),
        "phase2_bulk_fraction_of_limit": round(
            phase2_bulk_tokens / (args.tpm * phase2_seconds / args.window), 4
        )
        if phase2_seconds > 0
        else None,
        "ledger_calls_per_grant": round(ledger_totals.get("dynamodb_calls", 0) / grants, 2),
        "ledger_conflicts": ledger_totals.get("conflicts", 0),
        "ledger_errors": ledger_totals.get("ledger_errors", 0),
        "provider_requests": len(records),
    }
    if args.dump:
        Path(args.dump).write_text(
            json.dumps(
                {
                    "start": start,
                    "phase2_start": phase2_start,
                    "records": [asdict(r) for r in records],
                    "grants": sorted(g for r in bulk for g in r["grants"]),
                    "realtime": realtime["timeline"],
                }
            )
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Benchmark: the shared rate-limit ledger against a rate-limited OpenAI-compatible provider.

Bulk workers (separate processes, each with its own ledger and boto3 client, like concurrent Lambdas)
drain a backlog through the real `openai` SDK, reserving in a shared DynamoDB (a moto server) before
every call. Phase 1 is bulk only; phase 2 adds a realtime stream (API requests served by a few
"Lambdas" in one process) whose demand is larger than the bulk lane leaves free (by default about 30%
of the limit, where the bulk ceiling leaves 20%), so realtime truly contends with bulk.

What a real deployment has, played here: every process's clock is off by up to `--skew` (spread
evenly over +-skew), every request reaches the provider a random 0-`--max-delay` seconds after its
grant, and the ledger's guard (`--guard`, the provider's `guard_seconds`) covers both, and the API
processes' leases (`--lease`: a busy API process reserves for its next few requests at once). The bulk
workers belong to two tenants with `--tenant-share` of the limit each: "flood" (most workers) and
"steady" (`--steady-workers`); the ledger must hold the flooding tenant to its share.

The provider simulator (its own process) enforces TPM and RPM over a sliding window and records every
request it *received*, accepted or refused: `max_window_fraction` is computed from all of them, so an
over-grant shows there and not only as a 429. A realtime request shed with 429 counts as a wait of
the time it took to be refused.

Prints one JSON object as its last line; targets: http_429 0, max_window_fraction <= 1.0,
bulk_utilization >= 0.93 (phase 1, users idle), realtime_p99_wait_ms <= 500 (phase 2, contended),
flood_max_window_fraction <= tenant_share.

Run: .venv/bin/python benchmarks/bench_ratelimit.py [--workers 16 --realtime-rate 60 --realtime-threads 8 ...]
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
    guard: float
    lease: float
    pace: float
    idle_ceiling: float
    skew: float
    max_delay: float
    phase1: float
    phase2: float
    workers: int
    steady_workers: int
    tenant_share: float
    bulk_texts: int
    bulk_words: int
    realtime_rate: float
    realtime_threads: int
    realtime_words: int


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


def skew_of(index: int, count: int, skew: float) -> float:
    """Process `index`'s clock error: spread evenly over [-skew, +skew]."""
    return 0.0 if count < 2 else skew * (2 * index / (count - 1) - 1)


def make_ledger(cfg: Config, skew: float, *, lease: float = 0.0):
    from embedsvc.services.ratelimit import LimitSpec, RateLimitLedger

    limit = LimitSpec(
        key=f"openai:{MODEL}", tpm=cfg.tpm, rpm=cfg.rpm, window_seconds=cfg.window, guard_seconds=cfg.guard
    )
    ledger = RateLimitLedger(
        TABLE,
        dynamodb_client(cfg.endpoint),
        slots_per_window=cfg.slots,
        clock=lambda: time.time() + skew,
        lease_seconds=lease,
        bulk_pace=cfg.pace or None,
        bulk_idle_ceiling=cfg.idle_ceiling,
    )
    return limit, ledger


def bulk_worker(index: int, cfg: Config, barrier, start_value, results) -> None:
    """One bulk worker process: reserve, call the provider, reconcile, until the run ends."""
    import openai

    from embedsvc.errors import LedgerUnavailable, ServiceOverloaded
    from embedsvc.services.ratelimit import Lane

    tenant = "steady" if index < cfg.steady_workers else "flood"
    limit, ledger = make_ledger(cfg, skew_of(index, cfg.workers, cfg.skew))
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
    grants: list[tuple[str, float]] = []  # (request id, true time of the grant)
    while time.time() < end:
        if texts is None:
            texts = [
                " ".join(
                    rng.choice(WORDS) for _ in range(rng.randint(cfg.bulk_words - 20, cfg.bulk_words + 20))
                )
                for _ in range(cfg.bulk_texts)
            ]
        try:
            reservation = ledger.acquire(
                limit,
                count(texts),
                Lane.BULK,
                max_wait_seconds=60,
                tenant=tenant if cfg.tenant_share else None,
                tenant_share=cfg.tenant_share or None,
            )
        except ServiceOverloaded:
            overloaded += 1
            continue
        except LedgerUnavailable:
            unavailable += 1
            time.sleep(1)
            continue
        calls += 1
        request_id = f"{tenant}|{index}|{calls}"
        grants.append((request_id, time.time()))
        time.sleep(rng.uniform(0, cfg.max_delay))  # the network between the grant and the provider
        try:
            response = client.embeddings.create(model=MODEL, input=texts, user=request_id)
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
            "tenant": tenant,
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
    from embedsvc.services.ratelimit import Lane

    count = token_counter()
    ready = threading.Semaphore(0)
    jobs: queue.Queue[str | None] = queue.Queue()
    waits: list[
        tuple[float, float, float]
    ] = []  # (seconds to a grant or refusal, of them in DynamoDB, asked at)
    outcome = {"throttled": 0, "shed": 0, "calls": 0}
    ledgers: list = []
    lock = threading.Lock()

    def serve(thread_index: int) -> None:
        limit, ledger = make_ledger(
            cfg, skew_of(thread_index, cfg.realtime_threads, cfg.skew), lease=cfg.lease
        )
        client = openai.OpenAI(base_url=cfg.base_url, api_key="x", max_retries=0)
        rng = random.Random(10_000 + thread_index)
        warm_up(ledger, client, count)
        with lock:
            ledgers.append(ledger)
            ready.release()
        while (text := jobs.get()) is not None:
            started = time.time()
            dynamodb_before = ledger.stats()["dynamodb_seconds"]
            try:
                reservation = ledger.acquire(limit, count([text]), Lane.REALTIME, max_wait_seconds=5)
            except ServiceOverloaded:
                with lock:
                    outcome["shed"] += 1
                    # A shed request waited, then failed: its wait counts.
                    waits.append(
                        (time.time() - started, ledger.stats()["dynamodb_seconds"] - dynamodb_before)
                    )
                continue
            with lock:
                waits.append(
                    (time.time() - started, ledger.stats()["dynamodb_seconds"] - dynamodb_before, started)
                )
                outcome["calls"] += 1
            time.sleep(rng.uniform(0, cfg.max_delay))
            try:
                response = client.embeddings.create(model=MODEL, input=[text], user="realtime")
            except openai.RateLimitError as exc:
                with lock:
                    outcome["throttled"] += 1
                ledger.report_throttle(limit, retry_after_seconds(exc))
                ledger.reconcile(reservation, 0)
                continue
            ledger.reconcile(reservation, response.usage.prompt_tokens)

    threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(cfg.realtime_threads)]
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
        words = rng.randint(max(1, cfg.realtime_words * 2 // 3), max(1, cfg.realtime_words * 4 // 3))
        jobs.put(" ".join(rng.choice(WORDS) for _ in range(words)))
        sent += 1
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    merged: dict[str, float] = {}
    for ledger in ledgers:
        for name, value in ledger.stats().items():
            merged[name] = merged.get(name, 0) + value
    results.put({"role": "realtime", "sent": sent, "waits": waits, **outcome, "ledger": merged})


def max_window(records, window: float) -> tuple[int, int]:
    """The most tokens and requests the provider *received* in any window (T - window, T]."""
    records = sorted(records, key=lambda r: r.at)
    most_tokens = most_requests = left = in_window = 0
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
    from embedsvc.services.ratelimit import DEFAULT_BULK_IDLE_CEILING

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16, help="bulk worker processes")
    parser.add_argument("--steady-workers", type=int, default=2, help="of them, the second tenant's")
    parser.add_argument("--tenant-share", type=float, default=0.5, help="each tenant's share (0: no caps)")
    parser.add_argument("--window", type=float, default=20.0, help="the provider's window, seconds")
    parser.add_argument("--tpm", type=int, default=120_000, help="tokens per window")
    parser.add_argument("--rpm", type=int, default=2_400, help="requests per window")
    parser.add_argument(
        "--slots", type=int, default=60, help="the ledger's slots per window (60: the service's default)"
    )
    parser.add_argument("--guard", type=float, default=1.0, help="the ledger's guard, seconds")
    parser.add_argument(
        "--lease", type=float, default=0.25, help="an API process's realtime lease, seconds (0: none)"
    )
    parser.add_argument("--pace", type=float, default=1.2, help="bulk's most rate, x the average (0: off)")
    parser.add_argument(
        "--idle-ceiling",
        type=float,
        default=DEFAULT_BULK_IDLE_CEILING,
        help="the share of the limit bulk may use while users are idle (the service's default)",
    )
    parser.add_argument("--skew", type=float, default=0.2, help="clocks differ by up to +-this, seconds")
    parser.add_argument("--max-delay", type=float, default=0.1, help="grant-to-provider delay, 0 to this")
    parser.add_argument("--phase1", type=float, default=101.0, help="bulk only, seconds")
    parser.add_argument("--phase2", type=float, default=40.0, help="bulk and realtime, seconds")
    parser.add_argument("--latency", type=float, default=0.05, help="provider latency per request, seconds")
    parser.add_argument("--bulk-texts", type=int, default=16, help="texts per bulk request (~4,000 tokens)")
    parser.add_argument("--bulk-words", type=int, default=250, help="about one cl100k token per word")
    parser.add_argument("--realtime-rate", type=float, default=12.0, help="realtime requests per second")
    parser.add_argument("--realtime-threads", type=int, default=4, help="API processes serving them")
    parser.add_argument(
        "--realtime-share",
        type=float,
        default=0.3,
        help="realtime demand as a share of the limit (sets the query length: about one token a word)",
    )
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
        guard=args.guard,
        lease=args.lease,
        pace=args.pace,
        idle_ceiling=args.idle_ceiling,
        skew=args.skew,
        max_delay=args.max_delay,
        phase1=args.phase1,
        phase2=args.phase2,
        workers=args.workers,
        steady_workers=args.steady_workers if args.tenant_share else 0,
        tenant_share=args.tenant_share,
        bulk_texts=args.bulk_texts,
        bulk_words=args.bulk_words,
        realtime_rate=args.realtime_rate,
        realtime_threads=args.realtime_threads,
        realtime_words=max(1, round(args.realtime_share * args.tpm / args.window / args.realtime_rate)),
    )
    barrier = ctx.Barrier(args.workers + 2, timeout=300)
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
    reports = [results.get(timeout=args.phase1 + args.phase2 + 300) for _ in processes]
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

    most_tokens, most_requests = max_window(records, args.window)  # everything received
    flood_tokens, _ = max_window([r for r in records if (r.user or "").startswith("flood|")], args.window)
    steady_tokens, _ = max_window([r for r in records if (r.user or "").startswith("steady|")], args.window)
    realtime = next(r for r in reports if r["role"] == "realtime")
    waits = [seconds for seconds, _, _ in realtime["waits"]]
    # What the ledger made realtime wait for budget, without the time its DynamoDB calls took (a moto server
    # on a shared 2-core machine answers in tens to hundreds of milliseconds; DynamoDB in a few).
    budget_waits = [max(seconds - dynamodb, 0.0) for seconds, dynamodb, _ in realtime["waits"]]
    bulk = [r for r in reports if r["role"] == "bulk"]
    granted_at = {request_id: at for r in bulk for request_id, at in r["grants"]}
    delays = [r.at - granted_at[r.user] for r in records if r.user in granted_at]
    ledger_totals: dict[str, float] = {}
    for report in [*bulk, realtime]:
        for name, value in report["ledger"].items():
            ledger_totals[name] = ledger_totals.get(name, 0) + value
    grants = ledger_totals.get("grants", 0) or 1
    in_phase2 = [r for r in accepted if phase2_start <= r.at < phase2_start + args.phase2 - 1.0]
    phase2_bulk_tokens = sum(r.tokens for r in in_phase2 if r.user != "realtime")
    phase2_realtime_tokens = sum(r.tokens for r in in_phase2 if r.user == "realtime")
    # The realtime stream runs for phase2 - 1 s; both fractions are of the budget in that time.
    phase2_seconds = args.phase2 - 1.0
    per_window = args.tpm * phase2_seconds / args.window if phase2_seconds > 0 else None
    summary = {
        "workers": args.workers,
        "realtime_rate": args.realtime_rate,
        "realtime_threads": args.realtime_threads,
        "bulk_utilization": round(bulk_utilization, 4),
        "http_429": sum(1 for r in records if r.status == 429),
        "max_window_fraction": round(most_tokens / args.tpm, 4),
        "realtime_p99_wait_ms": percentile_ms(waits, 99),
        "realtime_p99_budget_wait_ms": percentile_ms(budget_waits, 99),
        "realtime_words": cfg.realtime_words,
        "flood_max_window_fraction": round(flood_tokens / args.tpm, 4),
        "tenant_share": args.tenant_share,
        "steady_max_window_fraction": round(steady_tokens / args.tpm, 4),
        "measured_windows": whole_windows,
        "max_window_request_fraction": round(most_requests / args.rpm, 4),
        "realtime_requests": realtime["sent"],
        "realtime_served": realtime["calls"],
        "realtime_shed": realtime["shed"],
        "realtime_p50_wait_ms": percentile_ms(waits, 50),
        "realtime_max_wait_ms": percentile_ms(waits, 100),
        "realtime_ledger_sleeps": realtime["ledger"].get("waits", 0),
        "phase2_realtime_fraction_of_limit": round(phase2_realtime_tokens / per_window, 4)
        if per_window
        else None,
        "phase2_bulk_fraction_of_limit": round(phase2_bulk_tokens / per_window, 4) if per_window else None,
        "delivery_delay_p99_ms": percentile_ms(delays, 99),
        "delivery_delay_max_ms": percentile_ms(delays, 100),
        "skew_s": args.skew,
        "guard_s": args.guard,
        "lease_s": args.lease,
        "bulk_pace": args.pace,
        "bulk_idle_ceiling": args.idle_ceiling,
        "realtime_lease_grants": realtime["ledger"].get("lease_grants", 0),
        "ledger_calls_per_grant": round(ledger_totals.get("dynamodb_calls", 0) / grants, 2),
        "dynamodb_call_ms": round(
            1000 * ledger_totals.get("dynamodb_seconds", 0) / max(ledger_totals.get("dynamodb_calls", 0), 1),
            1,
        ),
        "realtime_dynamodb_calls_per_request": round(
            realtime["ledger"].get("dynamodb_calls", 0) / max(realtime["sent"], 1), 2
        ),
        "ledger_conflicts": ledger_totals.get("conflicts", 0),
        "ledger_errors": ledger_totals.get("ledger_errors", 0),
        "provider_requests": len(records),
    }
    summary["targets_met"] = (
        summary["http_429"] == 0
        and summary["max_window_fraction"] <= 1.0
        and summary["bulk_utilization"] >= 0.93
        and (summary["realtime_p99_wait_ms"] or 0) <= 500
        and (not args.tenant_share or summary["flood_max_window_fraction"] <= args.tenant_share)
    )
    if args.dump:
        Path(args.dump).write_text(
            json.dumps(
                {
                    "start": start,
                    "phase2_start": phase2_start,
                    "records": [asdict(r) for r in records],
                    "grants": sorted(g for r in bulk for g in r["grants"]),
                    "realtime": realtime["waits"],
                }
            )
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

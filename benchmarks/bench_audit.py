"""The audit's merge-join at 10k, 50k and 100k rows, against the floor of merely paging through both sides.

Postgres: a throwaway database from embedsvc.local.postgres.resolve_local_database, as the tests use
(the server at 127.0.0.1:5432, else an embedded cluster; DATABASE_URL is ignored: seeding truncates
the content table). Qdrant: local mode in memory, random 384-dim float32
vectors. Planted at every size, exactly: 1,000 missing rows (no point), 1,000 stale points (other
text), 1,000 orphaned points (500 of deleted rows, 500 of no row), plus 500 deleted rows with their
tombstones (consistent) and 500 tombstones of no row (garbage, counted as `tombstones`). Rows and
points are n each.

Measured: the audit of one collection as a dry run (the walk, the comparison and the gap bookkeeping
in Postgres; nothing is sent or deleted), best of --repeats (3x as many below 50k); the floor is
iter_point_states + scroll_ids with the same page sizes, consumed without comparing, best of as many.
audit_peak_mb: tracemalloc's peak during one more dry run (a separate run: tracing slows Python down);
it includes local-mode Qdrant's own copy of every id per scroll page, which grows with n;
`replayed_peak_mb_by_n` is the audit's own peak with the walks replayed, flat in n.
At the largest size the audit then runs once with its actions (a queue that accepts everything):
`actions`.

Targets: counts exact at every size; time_ratio = seconds / floor_seconds <= 1.5 at the largest size;
audit_peak_mb <= 50 at every size; linear growth: the audit's own cost per row at the largest size at
most 1.5 x that at the smallest. "Own cost" is the same dry run with both id walks replayed from lists
read beforehand (`replayed_seconds_by_n`: comparing, counting, gap bookkeeping; no paging), because
local-mode Qdrant is not linear itself: each scroll page sorts every id of the collection again
(`LocalCollection._scroll_by_id`), so merely paging through 100k points costs ~30x what 10k do, and
the raw audit time follows its floor (`per_row_growth` and `floor_per_row_growth` show both; a Qdrant
server seeks to the page's offset instead). The last stdout line is the JSON result; exit status 1
when a target is missed.

    python benchmarks/bench_audit.py [--sizes 10000,50000,100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from _common import emit

DIMS = 384
CONTENT_TYPE = "verse"
MODEL = "minilm"
PLANTED = {"missing": 1000, "stale": 1000, "orphaned": 1000}
DELETED_ORPHANS = 500  # of the orphans: live points of deleted rows; the rest have no row at all
BURIED = 500  # deleted rows with their tombstone: consistent
GARBAGE = 500  # tombstones without a row
POINT_BATCH = 1000
ROW_BATCH = 10_000


class Replay:
    """A store or vector store whose id walk replays a list already read: the audit without paging I/O."""

    def __init__(self, target, **walks):
        self._target = target
        self._walks = walks

    def __getattr__(self, name):
        if name in self._walks:
            items = self._walks[name]
            return lambda *args, **kwargs: iter(items)
        return getattr(self._target, name)


class AcceptingQueue:
    def __init__(self) -> None:
        self.sent = 0

    def send(self, messages) -> list[int]:
        self.sent += len(messages)
        return []


def seed(db, vectors, n: int, rng) -> None:
    """n rows and n points with the planted gaps (see the module's doc)."""
    from embedsvc.adapters.content_store import content_hash, content_point_id
    from embedsvc.adapters.qdrant import Point, collection_name

    name = collection_name(CONTENT_TYPE, MODEL)
    with db.connection() as conn:
        conn.run("TRUNCATE content, consistency_gaps, repair_checkpoints")
    if vectors.exists(name):
        vectors.delete_collection(name)
    vectors.ensure_collection(name, DIMS)

    missing, stale = PLANTED["missing"], PLANTED["stale"]
    # Row i: [0, missing) no point; then stale; then deleted rows with a live point; then deleted rows
    # with a tombstone; the rest consistent. Point ids are UUIDv5, so these ranges scatter over the walk.
    bounds = [missing, missing + stale, missing + stale + DELETED_ORPHANS]
    bounds.append(bounds[-1] + BURIED)
    no_row = PLANTED["orphaned"] - DELETED_ORPHANS  # live points without a row
    assert n > bounds[-1] + no_row + GARBAGE

    ids = [f"Bench {i}" for i in range(n)]
    texts = [f"the text of verse {i}, long enough to look like one ({i * 7919 % 10007})" for i in range(n)]
    hashes = [content_hash(t) for t in texts]
    pids = [content_point_id(CONTENT_TYPE, i, None) for i in ids]
    for start in range(0, n, ROW_BATCH):
        end = min(start + ROW_BATCH, n)
        deleted = [bounds[1] <= i < bounds[3] for i in range(start, end)]
        with db.connection() as conn:
            conn.run(
                "INSERT INTO content (content_type, id, text, content_hash, point_id, deleted_at)"
                " SELECT :t, i, x, h, p, CASE WHEN d THEN clock_timestamp() END"
                " FROM unnest(CAST(:i AS text[]), CAST(:x AS text[]), CAST(:h AS text[]),"
                " CAST(:p AS uuid[]), CAST(:d AS boolean[])) AS r(i, x, h, p, d)",
                t=CONTENT_TYPE,
                i=ids[start:end],
                x=texts[start:end],
                h=hashes[start:end],
                p=pids[start:end],
                d=deleted,
            )

    def payload(*, content_id: str, digest: str | None, tombstone: bool) -> dict:
        return {
            "id": content_id,
            "content_type": CONTENT_TYPE,
            "owner_id": None,
            "content_hash": digest,
            "model": MODEL,
            "version": 1,
            "updated_at": 0,
            "deleted": tombstone,
        }

    points = []
    for i in range(missing, n):
        digest = "0" * 64 if i < bounds[1] else hashes[i]
        buried = bounds[2] <= i < bounds[3]
        points.append(
            (pids[i], payload(content_id=ids[i], digest=None if buried else digest, tombstone=buried))
        )
    for j in range(no_row + GARBAGE):
        content_id = f"Gone {j}"
        tombstone = j >= no_row
        digest = None if tombstone else content_hash(content_id)
        points.append(
            (
                content_point_id(CONTENT_TYPE, content_id, None),
                payload(content_id=content_id, digest=digest, tombstone=tombstone),
            )
        )
    assert len(points) == n
    for start in range(0, n, POINT_BATCH):
        chunk = points[start : start + POINT_BATCH]
        block = rng.standard_normal((len(chunk), DIMS), dtype="float32")
        vectors.upsert(name, [Point(pid, block[k], body) for k, (pid, body) in enumerate(chunk)])


def floor_seconds(store, vectors, rows_page: int, points_page: int) -> float:
    """Page through both id sets, consuming every item, comparing nothing."""
    from embedsvc.adapters.qdrant import collection_name

    started = time.perf_counter()
    rows = sum(1 for _ in store.iter_point_states(CONTENT_TYPE, page=rows_page))
    points = sum(1 for _ in vectors.scroll_ids(collection_name(CONTENT_TYPE, MODEL), page=points_page))
    elapsed = time.perf_counter() - started
    assert rows and points
    return elapsed


def measure(n: int, repeats: int, db, vectors, settings, rng) -> dict:
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.adapters.qdrant import collection_name
    from embedsvc.services.audit import POINTS_PAGE, ROWS_PAGE, AuditJob

    print(f"n={n}: seeding {n} rows and {n} points...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    seed(db, vectors, n, rng)
    print(f"n={n}: seeded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    store = ContentStore(db, settings.content_types)
    job = AuditJob(store, vectors, AcceptingQueue(), None, settings, None)  # type: ignore[arg-type]
    name = collection_name(CONTENT_TYPE, MODEL)

    floors, audits, report = [], [], None
    for _ in range(repeats):  # alternated, so drift (caches, a busy neighbour) hits both alike
        gc.collect()
        floors.append(floor_seconds(store, vectors, ROWS_PAGE, POINTS_PAGE))
        gc.collect()
        started = time.perf_counter()
        report = job.run(CONTENT_TYPE, dry_run=True)
        audits.append(time.perf_counter() - started)
    assert report is not None
    counts = report.collections[name].counts

    # The same audit with both id walks replayed from memory: what the audit's own code costs per row.
    rows = list(store.iter_point_states(CONTENT_TYPE, page=ROWS_PAGE))
    points = list(vectors.scroll_ids(name, page=POINTS_PAGE))
    replayed = AuditJob(
        Replay(store, iter_point_states=rows),  # type: ignore[arg-type]
        Replay(vectors, scroll_ids=points),  # type: ignore[arg-type]
        AcceptingQueue(),  # type: ignore[arg-type]
        None,
        settings,
        None,
    )
    replays = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        replayed.run(CONTENT_TYPE, dry_run=True)
        replays.append(time.perf_counter() - started)
    tracemalloc.start()
    replayed.run(CONTENT_TYPE, dry_run=True)
    _, replayed_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del rows, points, replayed
    gc.collect()

    tracemalloc.start()
    tracemalloc.reset_peak()
    job.run(CONTENT_TYPE, dry_run=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = {
        "n": n,
        "rows": counts.content + counts.deleted_content,
        "points": counts.points + counts.tombstone_points,
        "missing": counts.missing,
        "orphaned": counts.orphaned,
        "stale": counts.stale,
        "tombstones": counts.tombstones,
        "seconds": round(min(audits), 3),
        "floor_seconds": round(min(floors), 3),
        "time_ratio": round(min(audits) / min(floors), 3),
        "audit_peak_mb": round(peak / 2**20, 2),
        "replayed_seconds": round(min(replays), 3),
        "replayed_peak_mb": round(replayed_peak / 2**20, 2),  # the audit's own memory, paging aside
    }
    result["counts_exact"] = (
        result["rows"] == n
        and result["points"] == n
        and all(result[k] == v for k, v in PLANTED.items())
        and result["tombstones"] == GARBAGE
    )
    print(f"n={n}: {result}", file=sys.stderr, flush=True)
    return result


def actions(db, vectors, settings) -> dict:
    """The audit with its actions, once, on the data as seeded last (it changes it)."""
    from embedsvc.adapters.content_store import ContentStore
    from embedsvc.adapters.qdrant import collection_name
    from embedsvc.services.audit import AuditJob

    queue = AcceptingQueue()
    job = AuditJob(ContentStore(db, settings.content_types), vectors, queue, None, settings, None)  # type: ignore[arg-type]
    started = time.perf_counter()
    report = job.run(CONTENT_TYPE)
    audit = report.collections[collection_name(CONTENT_TYPE, MODEL)]
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "queued": audit.queued,
        "tombstone_requests": audit.tombstone_requests,
        "deleted": audit.deleted,
        "safety_valve_tripped": audit.safety_valve is not None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
    import warnings

    import numpy as np

    from embedsvc.adapters.postgres import Database
    from embedsvc.adapters.qdrant import VectorStore
    from embedsvc.config import Settings
    from embedsvc.db.migrations import upgrade
    from embedsvc.local.postgres import resolve_local_database

    warnings.filterwarnings("ignore", message=".*Local mode is not recommended.*")
    settings = Settings.load()
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # never someone's own database
        with resolve_local_database(Path(tmp), env=env, name=f"embedsvc_bench_audit_{os.getpid()}") as local:
            db = Database.from_url(local.url)
            upgrade(db)
            vectors = VectorStore.connect()
            try:
                # Small sizes take fractions of a second: more tries keep their minimum out of the noise.
                results = [
                    measure(n, args.repeats * (3 if n < 50_000 else 1), db, vectors, settings, rng)
                    for n in sizes
                ]
                done = actions(db, vectors, settings)
            finally:
                vectors.close()
                db.close()

    largest, smallest = results[-1], results[0]

    def per_row_growth(value) -> float:
        return (value(largest) / largest["n"]) / max(value(smallest) / smallest["n"], 1e-12)

    own_growth = per_row_growth(lambda r: r["replayed_seconds"])
    targets = {
        "counts_exact": all(r["counts_exact"] for r in results),
        "time_ratio_le_1_5": largest["time_ratio"] <= 1.5,
        "audit_peak_mb_le_50": max(r["audit_peak_mb"] for r in results) <= 50,
        "linear_growth": own_growth <= 1.5,
    }
    summary = {
        "n": largest["n"],
        "missing": largest["missing"],
        "orphaned": largest["orphaned"],
        "stale": largest["stale"],
        "tombstones": largest["tombstones"],
        "seconds": largest["seconds"],
        "floor_seconds": largest["floor_seconds"],
        "time_ratio": largest["time_ratio"],
        "audit_peak_mb": largest["audit_peak_mb"],
        "measured": "dry_run=True: walk, compare, record gaps; nothing sent or deleted",
        "seconds_by_n": {str(r["n"]): r["seconds"] for r in results},
        "floor_seconds_by_n": {str(r["n"]): r["floor_seconds"] for r in results},
        "time_ratio_by_n": {str(r["n"]): r["time_ratio"] for r in results},
        "audit_peak_mb_by_n": {str(r["n"]): r["audit_peak_mb"] for r in results},
        "replayed_seconds_by_n": {str(r["n"]): r["replayed_seconds"] for r in results},
        "replayed_per_row_growth": round(own_growth, 3),
        "replayed_peak_mb_by_n": {str(r["n"]): r["replayed_peak_mb"] for r in results},
        "per_row_growth": round(per_row_growth(lambda r: r["seconds"]), 3),
        "floor_per_row_growth": round(per_row_growth(lambda r: r["floor_seconds"]), 3),
        "actions": done,
        "targets": targets,
        "targets_met": all(targets.values()),
    }
    emit(summary)
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

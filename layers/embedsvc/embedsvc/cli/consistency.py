"""`embedsvc repair` and `embedsvc audit`: the content store against the vector index, on demand.

Both run the same jobs the scheduled Lambdas run (`container.repair_job()`, `container.audit_job()`).
With `--format json` the last stdout line is the report's JSON; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from embedsvc.services.audit import AuditReport
    from embedsvc.services.repair import RepairReport


@contextlib.contextmanager
def _bars(totals: dict[str, int], err: TextIO) -> Iterator[Callable[[str, int], None]]:
    """A progress callback drawing one tqdm bar per label on `err` (no bars without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the `local` extra only
        yield lambda label, n: None
        return
    isatty = getattr(err, "isatty", None)
    tty = bool(callable(isatty) and isatty())
    bars: dict[str, Any] = {}

    def update(label: str, n: int) -> None:
        if label not in bars:
            bars[label] = tqdm(
                total=totals.get(label), desc=label, unit="row", file=err, mininterval=0.1 if tty else 10.0
            )
        bars[label].update(n)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    return "\n".join(lines)


def repair_table(report: RepairReport) -> str:
    rows = []
    for content_type, result in report.content_types.items():
        moved = "advanced" if result.checkpoint_advanced else "left"
        for name, c in result.collections.items():
            rows.append([name, c.checked, c.queued, c.deleted, c.failed, moved])
        if result.error:
            rows.append([f"{content_type}: {result.error}", "", "", "", "", ""])
    return _table(["collection", "checked", "queued", "deleted", "failed", "checkpoint"], rows)


def audit_table(report: AuditReport) -> str:
    rows = []
    for name, audit in report.collections.items():
        c = audit.counts
        rows.append(
            [
                name,
                c.content,
                c.points,
                c.missing,
                c.stale,
                c.orphaned,
                c.tombstones,
                audit.queued,
                audit.deleted + audit.tombstone_requests,
                f"{audit.oldest_gap_seconds:.0f}",
            ]
        )
    headers = ["collection", "content", "points", "missing", "stale", "orphaned", "tombstones", "queued"]
    lines = [_table([*headers, "deleted", "oldest_gap_s"], rows)]
    for audit in report.collections.values():
        if audit.error:
            lines.append(f"{audit.collection}: error: {audit.error}")
        if audit.safety_valve:
            lines.append(f"SAFETY VALVE: {audit.safety_valve}")
    lines += [f"note: {note}" for note in report.notes]
    if report.dry_run:
        lines.append("dry run: nothing was queued or deleted")
    return "\n".join(lines)


def _totals(content_types: list[str], collections: bool) -> dict[str, int]:
    """Rows per progress label (content type, or each of its collections), for the bars' totals."""
    from embedsvc import container
    from embedsvc.adapters.qdrant import collection_name

    store = container.content_store()
    totals = {}
    for content_type in content_types:
        rows = store.count(content_type, include_deleted=True)
        if collections:
            for model in container.model_config().models_for(content_type):
                totals[collection_name(content_type, model)] = rows
        else:
            totals[content_type] = rows
    return totals


def _content_types(args: argparse.Namespace) -> list[str]:
    from embedsvc import container

    return [args.content_type] if args.content_type else list(container.settings().content_types)


def cmd_repair(
    args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Check rows changed since the checkpoint; 1 when a content type's checkpoint had to stay."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    from embedsvc import container

    job = container.repair_job()
    with _bars({}, err) as progress:
        report = job.run(args.content_type, progress=progress)
    print(json.dumps(report.as_dict()) if args.format == "json" else repair_table(report), file=out)
    return 0 if report.ok else 1


def cmd_audit(args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Audit every collection; 1 when a walk failed, the queue refused requests, or the safety valve tripped."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    from embedsvc import container

    job = container.audit_job()
    with _bars(_totals(_content_types(args), collections=True), err) as progress:
        report = job.run(args.content_type, dry_run=args.dry_run, progress=progress)
    print(json.dumps(report.as_dict()) if args.format == "json" else audit_table(report), file=out)
    return 0 if report.ok else 1


def add_consistency_parsers(commands: Any) -> None:
    """Register `repair` and `audit` on the CLI's subparsers."""
    repair = commands.add_parser(
        "repair", help="queue index requests for rows changed since the last repair that Qdrant lacks"
    )
    repair.add_argument("--content-type", help="one content type (default: every configured one)")
    repair.add_argument("--format", choices=("table", "json"), default="table")
    repair.set_defaults(func=cmd_repair)

    audit = commands.add_parser(
        "audit", help="compare every row with every point: missing, stale, orphaned; queue and delete"
    )
    audit.add_argument("--content-type", help="one content type (default: every configured one)")
    audit.add_argument("--dry-run", action="store_true", help="count and report; queue and delete nothing")
    audit.add_argument("--format", choices=("table", "json"), default="table")
    audit.set_defaults(func=cmd_audit)

"""`embedsvc costs`: who spent what, from the daily cost roll-up; `embedsvc costs break-even`: when
self-hosting a model beats the managed API, from a measured throughput.

The report reads only the roll-up (one Query per day and dimension), never raw logs. By default it reads
the local stack's roll-up that `make demo` leaves in .local/demo (moto keeps state in memory, so the demo
saves the table's items to costs-table.jsonl and this command loads them into its own moto); with --aws
it reads COSTS_TABLE in the environment's account. With `--format json` the last stdout line is the
report as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

SNAPSHOT_NAME = "costs-table.jsonl"


def default_workdir() -> Path:
    from embedsvc.local.stack import ROOT

    return ROOT / ".local" / "demo"


def _money(usd: float) -> str:
    if usd == 0:
        return "$0"
    return f"${usd:,.6f}" if usd < 1 else f"${usd:,.2f}"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def _rows(title: str, entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    if not entries:
        return [f"  {title}: none"]
    width = max(len(title), *(len(name) for name, _ in entries))
    lines = [f"  {title:<{width}}  {'tokens':>14}  {'USD':>12}  {'requests':>9}  {'saved tokens':>12}"]
    for name, t in entries:
        lines.append(
            f"  {name:<{width}}  {t['tokens']:>14,}  {_money(t['usd']):>12}  {t.get('requests', 0):>9,}"
            f"  {t.get('saved_tokens', 0):>12,}"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable tables."""
    total = report["totals"]
    lines = [
        f"Costs {report['from']} .. {report['to']} ({report['days']} days, UTC), from the daily roll-up",
        f"  total: {total['tokens']:,} tokens, {_money(total['usd'])}, {total['requests']:,} provider requests; "
        f"saved {report['saved_tokens']:,} tokens ({_money(report['saved_usd'])}) by the cache and unchanged content",
        "",
        *_rows(f"by {report['by']}", list(report["breakdown"].items())),
    ]
    if report.get("unattributed") and report["unattributed"]["tokens"]:
        left = report["unattributed"]
        lines.append(f"  (no {report['by']}: {left['tokens']:,} tokens, {_money(left['usd'])})")
    share = report["indexing_share"]
    lines += [
        "",
        f"  indexing vs queries: indexing {_pct(share['share_usd'])} of dollars, {_pct(share['share_tokens'])} of "
        f"tokens (indexing {share['indexing']['tokens']:,} tokens {_money(share['indexing']['usd'])}; "
        f"queries {share['queries']['tokens']:,} tokens {_money(share['queries']['usd'])}; "
        f"evaluation apart: {share['evaluation']['tokens']:,} tokens {_money(share['evaluation']['usd'])})",
        "",
        *_rows("top users", [(u["user_id"], u) for u in report["top_users"]]),
        "",
        *_rows("top tasks", [(f"{t['task_id']} ({','.join(t['sources'])})", t) for t in report["top_tasks"]]),
        "",
    ]
    if report["running_reindex"]:
        for task in report["running_reindex"]:
            lines.append(
                f"  RUNNING REINDEX: {task['task_id']} ({', '.join(task['sources'])}) last seen "
                f"{task['seconds_since_seen']:.0f}s ago, since {task['first_seen']}: {task['tokens']:,} tokens, "
                f"{_money(task['usd'])}, {task['requests']:,} requests so far"
            )
    else:
        lines.append("  running reindex: none (no reindex or backfill task spent in the last 15 minutes)")
    return "\n".join(lines)


def _report(args: argparse.Namespace, store: Any) -> int:
    from embedsvc.services.costs import build_report

    report = build_report(store, days=args.days, by=args.by, top=args.top, now=time.time())
    if args.chart:
        from embedsvc.charts.costs import render_spend_chart

        report["chart"] = str(render_spend_chart(report["per_day"], args.chart))
    print(format_report(report))
    if args.chart:
        print(f"\nchart: {report['chart']}")
    if args.format == "json":
        print(json.dumps(report, separators=(",", ":")))
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    """The cost report, from the AWS roll-up (--aws) or the local stack's saved one."""
    if args.days < 1 or args.top < 1:
        print("error: --days and --top must be at least 1", file=sys.stderr)
        return 2
    if args.aws:
        from embedsvc import container

        return _report(args, container.cost_store())
    snapshot = Path(args.workdir) / SNAPSHOT_NAME
    if not snapshot.is_file():
        print(
            f"error: no local cost roll-up at {snapshot}: run `make demo` first (it saves one there), "
            "or read the deployed table with --aws",
            file=sys.stderr,
        )
        return 2
    from embedsvc import container
    from embedsvc.local.stack import LocalStack

    with LocalStack(Path(args.workdir), serve_api=False, content_store=False, qdrant_in_memory=True):
        store = container.cost_store()
        store.import_items(snapshot)
        return _report(args, store)


def cmd_break_even(args: argparse.Namespace) -> int:
    """The monthly volume above which one self-hosted instance beats the managed API, with the arithmetic."""
    from embedsvc import container
    from embedsvc.services.costs import BreakEven

    if args.tokens_per_second <= 0 or args.instance_usd_per_hour <= 0 or not 0 < args.utilization <= 1:
        print(
            "error: --tokens-per-second and --instance-usd-per-hour must be positive, --utilization in (0, 1]",
            file=sys.stderr,
        )
        return 2
    spec = container.settings().registry.model(args.model)
    be = BreakEven(
        tokens_per_second=args.tokens_per_second,
        instance_usd_per_hour=args.instance_usd_per_hour,
        utilization=args.utilization,
        price_per_million=spec.price_per_million_tokens,
        model=spec.name,
    )
    print("\n".join(be.explain()))
    answer = be.as_dict()
    if args.chart:
        from embedsvc.charts.costs import render_break_even_chart

        answer["chart"] = str(render_break_even_chart(be, args.chart))
        print(f"chart: {answer['chart']}")
    if args.format == "json":
        print(json.dumps(answer, separators=(",", ":")))
    return 0


def add_costs_parser(commands: Any) -> None:
    """Register `costs` (and `costs break-even`) on the CLI's subparsers."""
    from embedsvc.services.costs import BREAKDOWNS

    costs = commands.add_parser(
        "costs",
        help="spend by source, model, user, task or tenant from the daily roll-up; `costs break-even`",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    costs.add_argument("--days", type=int, default=7, help="UTC days back, today included (default: 7)")
    costs.add_argument("--by", choices=BREAKDOWNS, default="source", help="the breakdown (default: source)")
    costs.add_argument("--top", type=int, default=10, help="how many top users and tasks (default: 10)")
    costs.add_argument("--format", choices=("table", "json"), default="table")
    costs.add_argument("--chart", type=Path, help="also draw spend per day by source as a PNG here")
    costs.add_argument("--aws", action="store_true", help="read COSTS_TABLE in the environment's AWS account")
    costs.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="the local stack whose saved roll-up to read (default: %(default)s, where `make demo` leaves it)",
    )
    costs.set_defaults(func=cmd_costs)
    sub = costs.add_subparsers(dest="costs_command", metavar="break-even")
    even = sub.add_parser(
        "break-even",
        help="the monthly token volume above which self-hosting beats the managed API",
        description=(
            "instance cost per month = Y x 730 h; capacity = X tokens/s x U x 3,600 x 730; managed cost = "
            "tokens x the model's price per 1M tokens (from the registry); break-even = instance cost / price "
            "per token. Measure X with `make bench-local-model`."
        ),
    )
    even.add_argument(
        "--tokens-per-second", type=float, required=True, help="measured throughput X of one instance"
    )
    even.add_argument("--instance-usd-per-hour", type=float, required=True, help="the instance's price Y")
    even.add_argument("--utilization", type=float, default=0.5, help="average busy share U (default: 0.5)")
    even.add_argument("--model", default="te3s", help="the managed model to compare with (default: te3s)")
    even.add_argument("--chart", type=Path, help="draw both monthly cost lines as a PNG here")
    even.add_argument("--format", choices=("table", "json"), default="table")
    even.set_defaults(func=cmd_break_even)

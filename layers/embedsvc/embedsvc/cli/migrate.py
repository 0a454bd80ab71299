"""`embedsvc migrate start|status|rollback`: the model migration workflow, from a terminal.

`start` validates the input here first (the same check the workflow's first step makes), refuses early
when the content type's lock is held, and starts MIGRATION_STATE_MACHINE_ARN; `--wait` follows the
phases until the execution ends. `status` reads the migration record: phase, backfill progress, the
last check of the new collection and the gate's metrics. `rollback` starts ROLLBACK_STATE_MACHINE_ARN
(the console's path) and waits for it; without one (the local stack) it runs the same step in-process.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")


def _requested_by(args: argparse.Namespace) -> str:
    if args.requested_by:
        return str(args.requested_by)
    try:
        return getpass.getuser()
    except Exception:  # no login name in a container
        return "cli"


def migration_input(args: argparse.Namespace) -> dict[str, Any]:
    """The execution input the flags describe (unset flags keep the workflow's defaults)."""
    payload: dict[str, Any] = {
        "content_type": args.content_type,
        "target_model": args.target_model,
        "ground_truth": args.ground_truth,
        "requested_by": _requested_by(args),
    }
    for key in (
        "qrels",
        "rollback_window_seconds",
        "max_metric_drop",
        "budget_usd",
        "budget_tokens",
        "check_interval_seconds",
        "window_poll_seconds",
    ):
        value = getattr(args, key, None)
        if value is not None:
            payload[key] = value
    return payload


def cmd_migrate_start(args: argparse.Namespace) -> int:
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.errors import ConfigError
    from embedsvc.services.migration.records import MigrationInProgress
    from embedsvc.services.migration.request import MigrationRequest

    settings = container.settings()
    payload = migration_input(args)
    MigrationRequest.parse(payload, settings)  # InvalidMigrationInput -> exit 2 with the message
    holder = container.migration_records().lock_holder(args.content_type)
    if holder and float(holder.get("expires_at", 0)) > time.time():
        raise MigrationInProgress(
            f"a migration of {args.content_type} is already running: {holder.get('migration_id')} "
            f"(execution {holder.get('owner')})"
        )
    arn = settings.migration_state_machine_arn
    if not arn:
        raise ConfigError(
            "MIGRATION_STATE_MACHINE_ARN is not set (the stack's MigrationStateMachineArn output)"
        )
    sfn = client("stepfunctions")
    name = f"{args.content_type}-{args.target_model}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    execution = sfn.start_execution(stateMachineArn=arn, name=name, input=json.dumps(payload))["executionArn"]
    print(json.dumps({"execution": execution, "input": payload}))
    if not args.wait:
        return 0
    return _follow(sfn, execution, args.content_type)


def _follow(sfn: Any, execution: str, content_type: str) -> int:
    """Print each phase as the record enters it, until the execution ends; exit 0 only on success."""
    from embedsvc import container

    seen: list[str] = []
    while True:
        status = sfn.describe_execution(executionArn=execution)
        record = container.migration_records().latest(content_type) or {}
        for phase in (record.get("phases") or [])[len(seen) :]:
            seen.append(phase)
            print(f"phase: {phase}", file=sys.stderr)
        if status["status"] in TERMINAL:
            print(json.dumps({"status": status["status"], "phases": seen, "error": status.get("error")}))
            return 0 if status["status"] == "SUCCEEDED" else 1
        time.sleep(2)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """`[#########.........]  31%  1,309/4,221`: the backfill's progress in one line."""
    from tqdm import tqdm

    total = max(total, 0)
    return tqdm.format_meter(
        done, total or None, 0, ncols=width + 40, bar_format="[{bar}] {percentage:3.0f}%  {n_fmt}/{total_fmt}"
    )


def status_lines(record: dict[str, Any], lock: dict[str, Any] | None) -> list[str]:
    """The human-readable status of one migration record."""
    lines = [
        f"migration {record['migration_id']}: {record.get('source_model')} -> {record.get('target_model')}",
        f"  status {record.get('status')}, phase {record.get('phase')} (phases: {' > '.join(record.get('phases') or [])})",
        f"  requested by {record.get('requested_by')} at {_when(record.get('started_at'))}",
    ]
    backfill = record.get("backfill") or {}
    if backfill:
        queued, total = int(backfill.get("queued", 0)), int(backfill.get("total", 0))
        lines.append(
            f"  backfill {progress_bar(min(queued, total), total)}{' done' if backfill.get('done') else ''}"
        )
    check = record.get("last_check") or {}
    if check:
        lines.append(
            f"  new collection: {check.get('points')} points, {check.get('missing')} missing, "
            f"{check.get('stale')} stale (check {check.get('checks')})"
        )
        if check.get("paused"):
            lines.append(f"  PAUSED: {check['paused']}")
    gate = record.get("gate") or {}
    if gate:
        lines.append(
            f"  gate {'passed' if gate.get('passed') else 'FAILED'} on {gate.get('queries')} queries"
            + (
                f" ({gate['changed_during_gate']} documents written during the gate left out)"
                if gate.get("changed_during_gate")
                else ""
            )
        )
        for metric, old in (gate.get("old_metrics") or {}).items():
            new = (gate.get("new_metrics") or {}).get(metric)
            mark = "  <- regressed" if metric in (gate.get("regressions") or []) else ""
            lines.append(f"    {metric:<14} {old:.4f} -> {new:.4f}{mark}")
    if record.get("window_ends_at") and record.get("status") == "running":
        lines.append(
            f"  rollback window ends {_when(record['window_ends_at'])}: embedsvc migrate rollback {record['content_type']}"
        )
    if "backfill_tokens" in record:
        lines.append(
            f"  backfill cost: {record['backfill_tokens']:,} tokens, ${record.get('backfill_cost_usd', 0):.6f}"
        )
    if record.get("error"):
        lines.append(f"  error: {record['error'].get('error')}: {record['error'].get('cause', '')[:300]}")
    if lock and lock.get("migration_id") == record["migration_id"]:
        lines.append(f"  lock held by {lock.get('owner')} until {_when(lock.get('expires_at'))}")
    return lines


def _when(epoch: Any) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_migrate_status(args: argparse.Namespace) -> int:
    from embedsvc import container

    records = container.migration_records()
    content_types = [args.content_type] if args.content_type else sorted(container.settings().content_types)
    answer: dict[str, Any] = {}
    for content_type in content_types:
        record = records.latest(content_type)
        models = container.model_config().get(content_type, fresh=True)
        answer[content_type] = {"models": models.model_dump(exclude_none=True), "migration": record}
        if args.format == "table":
            print(
                f"{content_type}: active {models.active}"
                + (f", shadow {models.shadow}" if models.shadow else "")
            )
            if record is None:
                print("  never migrated")
            else:
                print("\n".join(status_lines(record, records.lock_holder(content_type))))
    if args.format == "json":
        print(json.dumps(answer, default=str))
    return 0


def cmd_migrate_rollback(args: argparse.Namespace) -> int:
    from embedsvc import container

    settings = container.settings()
    payload = {"content_type": args.content_type, "requested_by": _requested_by(args)}
    if settings.rollback_state_machine_arn:
        from embedsvc.adapters.aws import client

        sfn = client("stepfunctions")
        execution = sfn.start_execution(
            stateMachineArn=settings.rollback_state_machine_arn, input=json.dumps(payload)
        )["executionArn"]
        while (status := sfn.describe_execution(executionArn=execution))["status"] not in TERMINAL:
            time.sleep(1)
        if status["status"] != "SUCCEEDED":
            print(
                json.dumps(
                    {"status": status["status"], "error": status.get("error"), "cause": status.get("cause")}
                )
            )
            return 2
        print(status.get("output") or "{}")
        return 0
    answer = container.migration_steps().request_rollback(args.content_type, payload["requested_by"])
    print(json.dumps(answer))
    return 0


def add_migrate_parser(commands: Any) -> None:
    """Register `migrate start`, `migrate status` and `migrate rollback`."""
    migrate = commands.add_parser("migrate", help="model migration: start, status, rollback")
    actions = migrate.add_subparsers(dest="migrate_command", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start the migration workflow for one content type")
    start.add_argument("content_type")
    start.add_argument("target_model", help="registry key or public name of the new model")
    start.add_argument("--ground-truth", required=True, help="s3://... or a local path: the gate's queries")
    start.add_argument("--qrels", help="BEIR qrels when --ground-truth is BEIR queries")
    start.add_argument("--rollback-window-seconds", type=int, help="default 172800 (48 h)")
    start.add_argument("--max-metric-drop", type=float, help="points a gated metric may drop (default 3)")
    start.add_argument("--budget-usd", type=float, help="stop spending on the backfill past this")
    start.add_argument("--budget-tokens", type=int)
    start.add_argument(
        "--check-interval-seconds", type=int, help="how often the new collection is audited (60)"
    )
    start.add_argument(
        "--window-poll-seconds", type=int, help="how often the rollback window is looked at (3600)"
    )
    start.add_argument("--requested-by", help="who asks (default: your login name)")
    start.add_argument("--wait", action="store_true", help="follow the phases until the execution ends")
    start.set_defaults(func=cmd_migrate_start)
    status = actions.add_parser("status", help="phase, backfill progress, last evaluation")
    status.add_argument("content_type", nargs="?")
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.set_defaults(func=cmd_migrate_status)
    rollback = actions.add_parser("rollback", help="switch back to the old model inside the rollback window")
    rollback.add_argument("content_type")
    rollback.add_argument("--requested-by")
    rollback.set_defaults(func=cmd_migrate_rollback)

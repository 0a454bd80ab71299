"""The migration workflow's steps, one method each; statemachines/migration.asl.json orders them.

Phases: begin (validate, lock, record) -> shadow (create the collection, dual-write) -> backfill ->
wait (audit the new collection until nothing is missing or stale) -> validate (the gate) -> cutover
(alias switch) -> rollback window -> cleanup (stop dual-writing, drop the old collection, record).
The refusal and rollback paths stop dual-writing and drop the new collection instead.

Every step is idempotent (Step Functions may run one twice): each sets state to a value rather than
changing it by a delta, and checks what is already done. Every config change is followed in the
workflow by a wait of `settle_seconds` (the config's max age plus slack) before anything relies on
every process having seen it (services/model_config.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger

from embedsvc.adapters.qdrant import collection_name
from embedsvc.errors import EmbedServiceError
from embedsvc.services.migration.records import MigrationInProgress
from embedsvc.services.migration.request import InvalidMigrationInput, MigrationRequest
from embedsvc.services.model_config import ContentModels

if TYPE_CHECKING:
    from embedsvc.config import Settings
    from embedsvc.services.migration.backfill import Backfill
    from embedsvc.services.migration.gate import MigrationGate
    from embedsvc.services.migration.records import MigrationRecords
    from embedsvc.services.model_config import ModelConfig

logger = Logger(child=True)

SETTLE_SLACK_SECONDS = 2
RESUMABLE_PHASES = ("begin", "shadow", "backfill", "wait", "validate")


class RollbackNotPossible(EmbedServiceError):
    status = 409
    type = "invalid_request_error"
    code = "rollback_not_possible"


class RollbackRequested(EmbedServiceError):
    """The cleanup lost the race to a rollback asked for at the end of the window (the workflow rolls back)."""

    code = "rollback_requested"


class BackfillStalled(EmbedServiceError):
    """The new collection did not fill within the allowed checks."""

    code = "backfill_stalled"


class MigrationSteps:
    def __init__(
        self,
        settings: Settings,
        model_config: ModelConfig,
        vectors: Any,
        records: MigrationRecords,
        backfill: Backfill,
        *,
        audit: Callable[[], Any],
        gate: Callable[[], MigrationGate],
        ground_truth_loader: Callable[[MigrationRequest], Any],
        execution_running: Callable[[str], bool] = lambda arn: True,
        task_costs: Callable[[str], dict[str, Any]] | None = None,
        budgets: Any = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.model_config = model_config
        self.vectors = vectors
        self.records = records
        self.backfill_job = backfill
        self.audit_job = audit  # built on first use: only the wait step needs it
        self.gate = gate
        self.ground_truth_loader = ground_truth_loader
        self.execution_running = execution_running
        self.task_costs = task_costs
        self.budgets = budgets
        self.clock = clock

    @property
    def settle_seconds(self) -> int:
        return self.settings.content_models_max_age_seconds + SETTLE_SLACK_SECONDS

    def _lease(self, request: dict[str, Any]) -> float:
        return 2 * max(request["check_interval_seconds"], request["window_poll_seconds"]) + 600

    # --- begin ---------------------------------------------------------------------------------------

    def begin(self, payload: Any, execution_arn: str) -> dict[str, Any]:
        """Validate the input, take the lock, and create the record (or resume an unfinished one)."""
        request = MigrationRequest.parse(payload, self.settings)
        current = self.model_config.get(request.content_type, fresh=True)
        latest = self.records.latest(request.content_type)
        resumable = (
            latest is not None
            and latest.get("status") == "running"
            and latest.get("target_model") == request.target_model
            # Before the cutover every step can run again: a killed execution's successor (or this
            # execution's own Begin, retried after a timeout that hid its success) picks the record up.
            and latest.get("phase") in RESUMABLE_PHASES
        )
        if not resumable and current.shadow is not None:
            raise MigrationInProgress(
                f"{request.content_type} is dual-writing to {current.shadow} already "
                f"(migration {current.migration}); finish or roll that back first"
            )
        if not resumable and request.target_model == current.active:
            raise InvalidMigrationInput(
                f"{request.target_model} is already the active model of {request.content_type}",
                param="target_model",
            )
        holder = self.records.lock_holder(request.content_type)
        stale = None
        if holder and holder.get("owner") != execution_arn and not self.execution_running(holder["owner"]):
            stale = holder["owner"]  # its execution stopped without releasing (killed, timed out)
        if resumable:
            assert latest is not None
            migration_id = latest["migration_id"]
        else:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            migration_id = f"mig-{request.content_type}-{request.target_model}-{stamp}-{uuid.uuid4().hex[:6]}"
        self.records.acquire(
            request.content_type,
            execution_arn,
            migration_id,
            self._lease(request.model_dump()),
            stale_owner=stale,
        )
        if resumable:
            self.records.update(migration_id, execution=execution_arn, resumed_at=self.clock())
            logger.info(
                "resuming migration",
                extra={"migration_id": migration_id, "phase": (latest or {}).get("phase")},
            )
            record = self.records.get(migration_id)
        else:
            record = self.records.create(
                {
                    "migration_id": migration_id,
                    "content_type": request.content_type,
                    "source_model": current.active,
                    "target_model": request.target_model,
                    "request": request.model_dump(exclude_none=True),
                    "requested_by": request.requested_by,
                    "execution": execution_arn,
                    "status": "running",
                    "phase": "begin",
                    "phases": ["begin"],
                    "started_at": self.clock(),
                }
            )
            if self.budgets is not None and (request.budget_usd or request.budget_tokens):
                self.budgets.set("task", migration_id, usd=request.budget_usd, tokens=request.budget_tokens)
        return {
            "migration_id": migration_id,
            "content_type": request.content_type,
            "source_model": record["source_model"],
            "target_model": request.target_model,
            "execution": execution_arn,
            "settle_seconds": self.settle_seconds,
            "check_interval_seconds": request.check_interval_seconds,
            "window_poll_seconds": request.window_poll_seconds,
            "resumed": resumable,
        }

    def _renew(self, m: dict[str, Any]) -> dict[str, Any]:
        record = self.records.get(m["migration_id"])
        self.records.acquire(
            m["content_type"], m["execution"], m["migration_id"], self._lease(record["request"])
        )
        return record

    # --- shadow --------------------------------------------------------------------------------------

    def shadow(self, m: dict[str, Any]) -> dict[str, Any]:
        """Create the new collection and switch the content type to dual-write (deletes included)."""
        self._renew(m)
        ct, source, target = m["content_type"], m["source_model"], m["target_model"]
        old, new = collection_name(ct, source), collection_name(ct, target)
        self.vectors.ensure_collection(new, self.settings.registry.models[target].dimensions)
        if self.vectors.exists(old):
            self.vectors.ensure_alias(ct, old)  # readers go through the alias from now on at the latest
        self.model_config.set(ct, ContentModels(active=source, shadow=target, migration=m["migration_id"]))
        self.records.append_phase(m["migration_id"], "shadow")
        return {"collection": new, "settle_seconds": self.settle_seconds}

    # --- backfill ------------------------------------------------------------------------------------

    def backfill(self, m: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Queue the next pages of the content store for the new collection (see backfill.py)."""
        record = self._renew(m)
        if record.get("phase") != "backfill":
            self.records.append_phase(m["migration_id"], "backfill")
        progress = self.backfill_job.run(
            m["migration_id"], m["content_type"], m["target_model"], seconds=seconds
        )
        return progress.to_dict()

    # --- wait ----------------------------------------------------------------------------------------

    def check(self, m: dict[str, Any]) -> dict[str, Any]:
        """Audit the new collection: ready when no live row is missing or stale there.

        A dry run while the queue fills the collection; once two checks in a row see no fewer rows
        missing, the next one re-queues what is missing (a message dead-lettered or lost), as the weekly
        audit would. While the backfill's budget is spent the migration is paused: the answer says why,
        and it never stalls.
        """
        record = self._renew(m)
        if record.get("phase") != "wait":
            self.records.append_phase(m["migration_id"], "wait")
        checks = int(record.get("checks", 0)) + 1
        paused = self._budget_pause(m["migration_id"])
        # Re-queue only when the last two checks saw the same number missing: the queue has stopped
        # filling the collection (a message lost or dead-lettered), not merely not finished draining.
        # While the budget is spent, re-queued rows would only be refused again.
        history = list(record.get("missing_history") or [])
        requeue = len(history) >= 2 and history[-1] > 0 and history[-1] >= history[-2] and paused is None
        audit = self.audit_job().audit_collection(m["content_type"], m["target_model"], dry_run=not requeue)
        if audit.error:
            from embedsvc.errors import TransientError

            raise TransientError(f"audit of {audit.collection} failed: {audit.error}")
        counts = audit.counts
        ready = counts.missing == 0 and counts.stale == 0
        max_checks = int(record["request"].get("max_checks", 1440))
        result = {
            "ready": ready,
            "missing": counts.missing,
            "stale": counts.stale,
            "points": counts.points,
            "checks": checks,
            "requeued": requeue,
            "paused": paused,
            "stalled": not ready and paused is None and checks >= max_checks,
        }
        # After a re-queue the count starts over: the next two checks must see it stall again.
        history = [] if requeue else (history + [counts.missing])[-2:]
        self.records.update(m["migration_id"], checks=checks, last_check=result, missing_history=history)
        if result["stalled"]:
            raise BackfillStalled(
                f"{audit.collection} still misses {counts.missing} and has {counts.stale} stale vectors "
                f"after {checks} checks"
            )
        return result

    def _budget_pause(self, migration_id: str) -> str | None:
        """Why the migration is paused for its budget, or None."""
        if self.budgets is None:
            return None
        budget = self.budgets.get("task", migration_id)
        if budget is None or not budget.exhausted:
            return None
        return (
            f"the backfill reached its budget (spent ${budget.spent_usd:.4f}, {budget.spent_tokens} tokens): "
            f"raise it with `embedsvc budgets set --task {migration_id} ...` to go on"
        )

    # --- validate ------------------------------------------------------------------------------------

    def validate(self, m: dict[str, Any]) -> dict[str, Any]:
        """Run the gate on the old and the new collection; the record keeps both metric sets."""
        record = self._renew(m)
        self.records.append_phase(m["migration_id"], "validate")
        request = MigrationRequest.model_validate(record["request"])
        ground_truth = self.ground_truth_loader(request)
        result = self.gate().evaluate(
            ground_truth,
            m["content_type"],
            m["source_model"],
            m["target_model"],
            max_metric_drop=request.max_metric_drop,
            alpha=request.alpha,
            task_id=m["migration_id"],
        )
        summary = result.to_dict()
        self.records.update(m["migration_id"], gate=summary)
        return {"passed": summary["passed"], "regressions": summary["regressions"]}

    # --- cutover and the window ------------------------------------------------------------------------

    def cutover(self, m: dict[str, Any]) -> dict[str, Any]:
        """Point the alias at the new collection (one atomic switch) and make the new model active.

        The old model stays the shadow: dual-writes go on through the rollback window.
        """
        record = self._renew(m)
        ct, source, target = m["content_type"], m["source_model"], m["target_model"]
        self.vectors.switch_alias(ct, collection_name(ct, target))
        self.model_config.set(ct, ContentModels(active=target, shadow=source, migration=m["migration_id"]))
        window = int(record["request"].get("rollback_window_seconds", 0))
        ends = record.get("window_ends_at") or self.clock() + window  # for people; the workflow counts waits
        self.records.update(
            m["migration_id"], cutover_at=record.get("cutover_at") or self.clock(), window_ends_at=ends
        )
        self.records.append_phase(m["migration_id"], "rollback_window")
        return self.window(m)

    def window(self, m: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """What to do in the rollback window: `rollback` (asked for), `cleanup` (over) or `wait` N seconds.

        The window is measured in the workflow's own waited seconds, summed poll by poll: on AWS that is
        at least the wall-clock time (steps take time too, so the window errs long), and a local run that
        fast-forwards its Wait states sees the same sequence of decisions. `previous` is the last answer;
        its `poll` number makes a step run twice count its wait once.
        """
        record = self._renew(m)
        waited = float(record.get("window_waited_seconds", 0))
        poll = int(record.get("window_poll", 0))
        if (
            previous is not None
            and previous.get("action") == "wait"
            and int(previous.get("poll", -1)) == poll
        ):
            waited += float(previous.get("wait_seconds", 0))
            poll += 1
            self.records.update(m["migration_id"], window_waited_seconds=waited, window_poll=poll)
        if record.get("rollback_requested"):
            return {"action": "rollback", "wait_seconds": 0, "poll": poll}
        remaining = float(record["request"].get("rollback_window_seconds", 0)) - waited
        if remaining <= 0:
            return {"action": "cleanup", "wait_seconds": 0, "poll": poll}
        every = int(record["request"].get("window_poll_seconds", 3600))
        return {"action": "wait", "wait_seconds": max(1, int(min(every, remaining + 0.999))), "poll": poll}

    def request_rollback(self, content_type: str, requested_by: str) -> dict[str, Any]:
        """Switch the alias back now (the CLI and the rollback state machine); the workflow then drops the new one."""
        record = self.records.latest(content_type)
        if record is None or record.get("status") != "running" or record.get("phase") != "rollback_window":
            phase = None if record is None else f"{record.get('status')}/{record.get('phase')}"
            raise RollbackNotPossible(
                f"no migration of {content_type} is in its rollback window (latest: {phase or 'none'})"
            )
        if not self.records.claim(record["migration_id"], "rollback_requested", unless="cleanup_started"):
            raise RollbackNotPossible(
                f"the rollback window of {record['migration_id']} is over: its cleanup has begun"
            )
        ct, source, target = content_type, record["source_model"], record["target_model"]
        self.vectors.switch_alias(ct, collection_name(ct, source))
        # The new collection stays the shadow until the workflow drops it, so nothing written meanwhile is lost
        # should the rollback itself be undone by hand.
        self.model_config.set(
            ct, ContentModels(active=source, shadow=target, migration=record["migration_id"])
        )
        self.records.update(record["migration_id"], rolled_back_at=self.clock(), rolled_back_by=requested_by)
        self.records.append_phase(record["migration_id"], "rolling_back")
        return {
            "migration_id": record["migration_id"],
            "active_model": source,
            "alias": collection_name(ct, source),
        }

    # --- the endings -----------------------------------------------------------------------------------

    def stop_dual_write(self, m: dict[str, Any], keep: str) -> dict[str, Any]:
        """Write only `keep`'s collection from now on ("source" or "target").

        Keeping the target is the cleanup: it first claims the record against a rollback asked for at the
        last moment (RollbackRequested sends the workflow down the rollback path instead). Keeping the
        source makes sure the alias is on the old collection too (a rollback whose own alias switch failed).
        """
        self._renew(m)
        ct = m["content_type"]
        if keep == "target":
            if not self.records.claim(m["migration_id"], "cleanup_started", unless="rollback_requested"):
                raise RollbackRequested(f"a rollback of {m['migration_id']} was asked for: rolling back")
            model = m["target_model"]
        else:
            model = m["source_model"]
            old = collection_name(ct, model)
            if self.vectors.alias_target(ct) not in (None, old) and self.vectors.exists(old):
                self.vectors.switch_alias(ct, old)
        self.model_config.set(ct, ContentModels(active=model))
        return {"active_model": model, "settle_seconds": self.settle_seconds}

    def finish(self, m: dict[str, Any], outcome: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """Drop the collection the outcome leaves unused, record the migration, release the lock.

        `completed`: the old collection goes; `refused`, `rolled_back`, `failed` before the cutover: the new one.
        """
        record = self.records.get(m["migration_id"])
        ct = m["content_type"]
        old, new = collection_name(ct, m["source_model"]), collection_name(ct, m["target_model"])
        alias_target = self.vectors.alias_target(ct)
        drop: str | None = old if outcome == "completed" else new
        if drop == alias_target:
            drop = None  # never drop what readers search (a failure after the cutover keeps the new one)
        if drop is not None and self.vectors.exists(drop):
            self.vectors.delete_collection(drop)
        costs = self.task_costs(m["migration_id"]) if self.task_costs else {}
        finished = self.clock()
        summary = {
            "status": outcome,
            "phase": outcome,
            "finished_at": finished,
            "duration_seconds": finished - float(record.get("started_at", finished)),
            "dropped_collection": drop,
            "active_model": self.model_config.get(ct, fresh=True).active,
            "backfill_tokens": int(costs.get("tokens", 0)),
            "backfill_cost_usd": float(costs.get("usd", 0.0)),
        }
        if error:
            summary["error"] = {
                "error": str(error.get("Error", "")),
                "cause": str(error.get("Cause", ""))[:2000],
            }
        self.records.update(m["migration_id"], **summary)
        self.records.append_phase(m["migration_id"], outcome)
        self.records.release(ct, m["execution"])
        logger.info("migration finished", extra={"migration_id": m["migration_id"], "status": outcome})
        return {**summary, "migration_id": m["migration_id"]}

    def abort(self, m: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
        """A step failed for good: before the cutover, go back to the old model alone; after it, keep serving.

        Returns whether the workflow must wait for the config to settle before `finish` drops anything.
        """
        ct = m["content_type"]
        after_cutover = self.vectors.alias_target(ct) == collection_name(ct, m["target_model"])
        # Before the cutover the old model alone again; after it the new one keeps serving alone, and the
        # old collection is kept (not dropped) for a person to look at.
        keep = m["target_model"] if after_cutover else m["source_model"]
        self.model_config.set(ct, ContentModels(active=keep))
        logger.error(
            "migration step failed",
            extra={"migration_id": m["migration_id"], "error": str(error.get("Error", ""))},
        )
        return {"settle_seconds": self.settle_seconds}


def load_ground_truth(request: MigrationRequest) -> Any:
    """The gate's ground truth: `ground_truth` (+ `qrels`), from S3 on AWS or a local path."""
    from embedsvc.services.evaluation.job import EvaluationRequest, load_request_ground_truth

    evaluation = EvaluationRequest(
        content_type=request.content_type,
        ground_truth=request.ground_truth,
        qrels=request.qrels,
        name=request.ground_truth_name,
    )
    return load_request_ground_truth(evaluation)


def runs_location() -> str:
    """Where the gate's runs go: the evaluation's bucket on AWS, else a local folder."""
    import os

    if os.environ.get("EVAL_BUCKET"):
        from embedsvc.services.evaluation.job import runs_location as bucket_location

        return bucket_location()
    qdrant_path = os.environ.get("QDRANT_PATH")
    from pathlib import Path

    root = Path(qdrant_path).parent if qdrant_path else Path.cwd() / ".local"
    return str(root / "migration-runs")


def execution_running(execution_arn: str) -> bool:
    """Whether a Step Functions execution still runs (unknown counts as running: never steal a live lock)."""
    from embedsvc.adapters.aws import client

    try:
        return client("stepfunctions").describe_execution(executionArn=execution_arn)["status"] == "RUNNING"
    except Exception:
        return True

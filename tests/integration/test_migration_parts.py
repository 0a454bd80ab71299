"""The migration's parts against moto: the SSM model config, the input check, the lock and the record."""

from __future__ import annotations

import pytest

from embedsvc.errors import ConfigError
from embedsvc.services.migration.records import MigrationInProgress, MigrationRecords
from embedsvc.services.migration.request import InvalidMigrationInput, MigrationRequest
from embedsvc.services.model_config import ContentModels, ModelConfig, ModelConfigUnavailable

PREFIX = "/embedsvc/test/content-models"


def _config(**kwargs) -> ModelConfig:
    from embedsvc import container
    from embedsvc.adapters.aws import client

    return ModelConfig(container.settings(), client("ssm"), prefix=PREFIX, **kwargs)


def test_model_config_falls_back_to_settings_then_follows_ssm(aws, monkeypatch):
    from embedsvc import container

    monkeypatch.setenv("CONTENT_MODELS", '{"verse": ["minilm"]}')
    container.reset_settings()
    config = _config(max_age=0)
    assert config.models_for("verse") == ["minilm"]  # no parameter yet: the static setting
    assert config.models_for("note") == [container.settings().registry.default_model]
    config.set("verse", ContentModels(active="minilm", shadow="te3s", migration="m1"))
    other_process = _config(max_age=0)
    assert other_process.models_for("verse") == ["minilm", "te3s"]
    assert other_process.get("verse").migration == "m1"


def test_model_config_caches_for_max_age_and_keeps_the_last_value_when_ssm_fails(aws):
    writer, reader = _config(), _config(max_age=300)
    writer.set("verse", ContentModels(active="minilm"))
    assert reader.models_for("verse") == ["minilm"]
    writer.set("verse", ContentModels(active="minilm", shadow="te3s"))
    assert reader.models_for("verse") == ["minilm"]  # cached: seen within max_age, not at once
    assert reader.get("verse", fresh=True).shadow == "te3s"

    class Broken:
        def get_parameter(self, **kwargs):
            raise RuntimeError("ssm down")

    reader._provider.client = Broken()
    assert reader.get("verse", fresh=True).writes() == ["minilm", "te3s"]  # the last value read
    never_read = _config(max_age=0)
    never_read._ssm_provider().client = Broken()
    with pytest.raises(ModelConfigUnavailable):
        never_read.get("verse")


def test_model_config_refuses_unknown_models(aws):
    from embedsvc.adapters.aws import client

    config = _config(max_age=0)
    with pytest.raises(ConfigError, match="not registered"):
        config.set("verse", ContentModels(active="nope"))
    client("ssm").put_parameter(Name=f"{PREFIX}/verse", Value='{"active": "nope"}', Type="String")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        config.get("verse")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("verse", "must be a JSON object"),
        ({"content_type": "verse", "target_model": "minilm"}, "ground_truth: Field required"),
        (
            {"content_type": "psalm", "target_model": "minilm", "ground_truth": "g"},
            "unknown content type 'psalm'",
        ),
        (
            {"content_type": "verse", "target_model": "bert", "ground_truth": "g"},
            "unknown target_model 'bert'",
        ),
        (
            {
                "content_type": "verse",
                "target_model": "minilm",
                "ground_truth": "g",
                "rollback_window_seconds": -1,
            },
            "rollback_window_seconds",
        ),
        ({"content_type": "verse", "target_model": "minilm", "ground_truth": "g", "extra": 1}, "extra"),
    ],
)
def test_migration_input_is_validated_with_a_clear_message(env, payload, message):
    from embedsvc import container

    with pytest.raises(InvalidMigrationInput, match=message):
        MigrationRequest.parse(payload, container.settings())


def test_migration_input_accepts_a_public_model_name(env):
    from embedsvc import container

    request = MigrationRequest.parse(
        {"content_type": "verse", "target_model": "text-embedding-3-small", "ground_truth": "g"},
        container.settings(),
    )
    assert request.target_model == "te3s" and request.rollback_window_seconds == 172800


def test_lock_has_one_owner_expires_and_can_be_taken_from_a_dead_execution(aws):
    from embedsvc import container
    from embedsvc.adapters.aws import client

    now = [1000.0]
    records = MigrationRecords(container.settings().state_table, client("dynamodb"), clock=lambda: now[0])
    records.acquire("verse", "exec-a", "m1", 60)
    records.acquire("verse", "exec-a", "m1", 60)  # the owner renews
    with pytest.raises(MigrationInProgress, match="m1"):
        records.acquire("verse", "exec-b", "m2", 60)
    records.acquire("verse", "exec-b", "m2", 60, stale_owner="exec-a")  # exec-a no longer runs
    assert records.lock_holder("verse")["owner"] == "exec-b"
    now[0] += 16 * 60  # past the minimum lease
    records.acquire("verse", "exec-c", "m3", 60)  # expired: free
    records.release("verse", "exec-b")  # not the owner: nothing happens
    assert records.lock_holder("verse")["owner"] == "exec-c"
    records.release("verse", "exec-c")
    assert records.lock_holder("verse") is None


def test_record_round_trips_and_phases_are_recorded_once(aws):
    from embedsvc import container
    from embedsvc.adapters.aws import client

    records = MigrationRecords(container.settings().state_table, client("dynamodb"))
    records.create({"migration_id": "m1", "content_type": "verse", "status": "running", "phases": ["begin"]})
    records.update("m1", backfill={"queued": 10, "cursor": "abc", "done": False}, gate={"ndcg": 0.25})
    records.append_phase("m1", "shadow")
    records.append_phase("m1", "shadow")  # a step run twice
    record = records.latest("verse")
    assert record["phases"] == ["begin", "shadow"] and record["phase"] == "shadow"
    assert (
        record["backfill"] == {"queued": 10, "cursor": "abc", "done": False}
        and record["gate"]["ndcg"] == 0.25
    )
    records.update("m1", gate=None)
    assert "gate" not in records.get("m1")


def test_cleanup_and_a_late_rollback_cannot_both_win(aws):
    from embedsvc import container
    from embedsvc.adapters.aws import client

    records = MigrationRecords(container.settings().state_table, client("dynamodb"))
    for mid in ("m1", "m2"):
        records.create({"migration_id": mid, "content_type": f"t{mid}", "status": "running"})
    assert records.claim("m1", "cleanup_started", unless="rollback_requested")
    assert records.claim("m1", "cleanup_started", unless="rollback_requested")  # a retried step
    assert not records.claim("m1", "rollback_requested", unless="cleanup_started")
    assert records.claim("m2", "rollback_requested", unless="cleanup_started")
    assert not records.claim("m2", "cleanup_started", unless="rollback_requested")


def test_a_backfill_over_its_budget_pauses_with_the_reason(aws):
    """The wait step reports the pause (and never calls it stalled) while the task's budget is spent."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.services.budgets import Budget
    from embedsvc.services.merge_join import MergeCounts
    from embedsvc.services.migration.steps import MigrationSteps

    class Audit:
        def audit_collection(self, content_type, model, *, dry_run):
            class Result:
                collection, error = f"{content_type}_{model}", None
                counts = MergeCounts(content=10, points=4, missing=6)

            return Result()

    class Budgets:
        def get(self, scope, key):
            return Budget(None, 1000, 0.0, 1000, None, 0, True, scope, key)

    records = MigrationRecords(container.settings().state_table, client("dynamodb"))
    records.create(
        {
            "migration_id": "m1",
            "content_type": "verse",
            "status": "running",
            "request": {"check_interval_seconds": 1, "window_poll_seconds": 1, "max_checks": 1},
        }
    )
    steps = MigrationSteps(
        container.settings(),
        ModelConfig(container.settings()),
        vectors=None,
        records=records,
        backfill=None,  # type: ignore[arg-type]
        audit=Audit,
        gate=lambda: None,  # type: ignore[arg-type,return-value]
        ground_truth_loader=lambda request: None,
        budgets=Budgets(),
    )
    m = {"migration_id": "m1", "content_type": "verse", "execution": "exec-1", "target_model": "minilm-int8"}
    result = steps.check(m)  # max_checks is 1: unpaused, this would be a stall
    assert result["ready"] is False and result["stalled"] is False
    assert "reached its budget" in result["paused"] and "embedsvc budgets set --task m1" in result["paused"]
    assert records.get("m1")["last_check"]["paused"] == result["paused"]


def test_migrate_status_shows_phase_progress_and_the_gate(aws, capsys, monkeypatch):
    import json

    from embedsvc import container
    from embedsvc.cli import main

    records = container.migration_records()
    records.create(
        {
            "migration_id": "mig-verse-minilm-int8-1",
            "content_type": "verse",
            "source_model": "minilm",
            "target_model": "minilm-int8",
            "status": "running",
            "phase": "wait",
            "phases": ["begin", "shadow", "backfill", "wait"],
            "requested_by": "ana",
            "started_at": 1796178442.0,
            "backfill": {"queued": 1309, "total": 4221, "done": False},
            "last_check": {"points": 1200, "missing": 3021, "stale": 0, "checks": 4, "paused": None},
            "gate": {
                "passed": False,
                "queries": 500,
                "old_metrics": {"ndcg_at_10": 0.25},
                "new_metrics": {"ndcg_at_10": 0.20},
                "regressions": ["ndcg_at_10"],
            },
        }
    )
    assert main(["migrate", "status", "verse"]) == 0
    out = capsys.readouterr().out
    assert "verse: active minilm" in out and "phase wait" in out and "requested by ana" in out
    assert "31%" in out and "1309/4221" in out  # the backfill's progress bar
    assert "3021 missing" in out and "gate FAILED on 500 queries" in out and "<- regressed" in out
    assert main(["migrate", "status", "note", "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["note"]["migration"] is None and answer["note"]["models"]["active"]


def test_migrate_start_refuses_bad_input_before_starting_anything(aws, capsys):
    from embedsvc.cli import main

    assert main(["migrate", "start", "verse", "bert", "--ground-truth", "g.jsonl"]) == 2
    assert "unknown target_model 'bert'" in capsys.readouterr().err

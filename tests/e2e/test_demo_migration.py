"""`make demo-migration` on one short book: a migration under load, then the gate refusing a weaker model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from embedsvc.local.demo import DATA
from embedsvc.services.evaluation.metrics import GATE_METRICS

KEYS = {
    "phases",
    "active_model",
    "old_metrics",
    "new_metrics",
    "search_errors",
    "searches",
    "writes_during_migration",
    "writes_lost",
    "backfill_tokens",
    "backfill_cost_usd",
    "refused_migration",
}


@pytest.mark.slow
def test_the_migration_demo_migrates_under_load_and_the_gate_refuses_the_weak_model(tmp_path):
    if not (DATA / "bible" / "bsb_verses.jsonl").exists() or not (DATA / "bible_eval" / "topics").exists():
        pytest.skip("../shared/data is not beside the repository")
    # Given the demo in a process of its own, as `make demo-migration` runs it, on one short book
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "POWERTOOLS_"))}
    # When it runs
    answer = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedsvc.cli",
            "demo-migration",
            "--quick",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    # Then it exits 0 and its last line is the summary, with exactly the keys
    out = answer.stdout
    assert answer.returncode == 0, out + answer.stderr[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == KEYS
    # the first migration went through every phase to the end, and the new model serves
    assert summary["phases"] == [
        "begin",
        "shadow",
        "backfill",
        "wait",
        "validate",
        "rollback_window",
        "completed",
    ]
    assert summary["active_model"] == "minilm-int8"
    assert set(GATE_METRICS) <= set(summary["old_metrics"]) == set(summary["new_metrics"])
    assert summary["backfill_tokens"] > 0
    assert summary["backfill_cost_usd"] == 0  # a self-hosted model: tokens counted, no dollars
    # searches ran throughout and none failed; writes made during the migration all landed
    assert summary["searches"] > 0 and summary["search_errors"] == 0
    assert summary["writes_during_migration"] > 0 and summary["writes_lost"] == 0
    # the weak model was refused by the gate and the alias stayed where it was
    assert summary["refused_migration"] == {
        "target_model": "minilm-m2v",
        "gate": "failed",
        "alias_moved": False,
    }
    assert "alias verse -> verse_minilm-int8, verse_minilm dropped" in out
    assert "verse_minilm-m2v dropped; config active minilm-int8, shadow None" in out

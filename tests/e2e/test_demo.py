"""`make demo` end to end on one small book: API, content store, queue, worker, search, audit, repair."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from embedsvc.local.demo import DATA


@pytest.mark.slow
def test_the_demo_opens_every_kind_of_gap_and_closes_them(tmp_path):
    if not (DATA / "bible" / "bsb_verses.jsonl").exists():
        pytest.skip("../shared/data is not beside the repository")
    # A process of its own, as `make demo` runs it: the stack sets the environment and logging of its process.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "POWERTOOLS_"))}
    answer = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedsvc.cli",
            "demo",
            "--books",
            "Ruth",
            "--skip-eval",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    out = answer.stdout
    assert answer.returncode == 0, out + answer.stderr[-3000:]
    assert "another tenant's search: 0 hits; its GET note/n2: 404" in out
    audit = out[out.index("weekly audit") :]
    first, second = audit.split("audit again:")
    row = next(line.split() for line in first.splitlines() if line.strip().startswith("verse_minilm"))
    # content, points, missing, orphaned, stale: the gaps the demo opened on purpose
    assert [int(x.replace(",", "")) for x in row[1:6]][2:] == [20, 2, 10]
    row = next(line.split() for line in second.splitlines() if line.strip().startswith("verse_minilm"))
    assert [int(x.replace(",", "")) for x in row[1:6]][2:] == [0, 0, 0]
    assert "gap closed: True" in out

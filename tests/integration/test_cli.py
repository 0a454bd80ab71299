"""The operator CLI's commands against moto: API keys and enqueueing index messages."""

from __future__ import annotations

import io
import json

import pytest

from embedsvc.cli import main


@pytest.fixture
def queue(aws, monkeypatch):
    from embedsvc.adapters.aws import client
    from embedsvc.container import reset_settings

    url = client("sqs").create_queue(QueueName="cli-index")["QueueUrl"]
    monkeypatch.setenv("INDEX_QUEUE_URL", url)
    reset_settings()
    return url


def test_keys_create_prints_a_working_key_once_and_revoke_reads_it_from_stdin(aws, capsys, monkeypatch):
    from embedsvc import container
    from embedsvc.errors import Unauthorized

    assert main(["keys", "create", "--tenant", "t1", "--user", "u1"]) == 0
    key = json.loads(capsys.readouterr().out)["api_key"]
    assert container.api_keys().authenticate(f"Bearer {key}").tenant_id == "t1"
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert main(["keys", "revoke"]) == 0
    with pytest.raises(Unauthorized):
        container.api_keys().authenticate(f"Bearer {key}")


def test_enqueue_validates_every_line_and_sends_the_good_ones(queue, tmp_path, capsys):
    from embedsvc.adapters.aws import client

    lines = [json.dumps({"content_type": "verse", "id": f"v{i}", "text": f"verse {i}"}) for i in range(12)]
    lines.insert(3, json.dumps({"content_type": "Bad Type", "id": "x", "text": "t"}))
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["enqueue", str(path)]) == 1  # one line was rejected
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1]) == {"sent": 12, "rejected": 1, "failed": 0}
    assert "line 4" in out.err
    attributes = client("sqs").get_queue_attributes(
        QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "12"


def test_keys_refuse_tenant_ids_longer_than_a_tag(aws, capsys):
    from embedsvc.cli import main

    assert main(["keys", "create", "--tenant", "t" * 129, "--user", "u"]) == 2
    assert "tenant id must have 1 to 128 characters" in capsys.readouterr().err

"""`make serve` in a subprocess, driven by the official openai SDK with its default settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from embedsvc.local.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TEXTS = [
    "In the beginning God created the heavens and the earth.",
    "Jesus wept.",
    "The Lord is my shepherd; I shall not want.",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "LOCAL_API_KEY": "sk-e2e-key", "POWERTOOLS_LOG_LEVEL": "ERROR"}
    workdir = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(
        ["make", "-s", "serve", f"SERVE_ARGS=--workdir {workdir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so the whole group (make and the server) can be stopped
    )
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if line.startswith("serving "):
            break
        if process.poll() is not None:
            pytest.fail("make serve exited:\n" + "".join(lines))
    else:
        pytest.fail("make serve did not start:\n" + "".join(lines))
    yield f"http://127.0.0.1:{port}/v1"
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_sdk_defaults_get_the_local_models_vectors(served):
    from sentence_transformers import SentenceTransformer

    from embedsvc.adapters.providers.local_model import model_path

    client = openai.OpenAI(base_url=served, api_key="sk-e2e-key")  # defaults: base64 encoding, 2 retries
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    served_vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    direct = SentenceTransformer(model_path(), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert served_vectors.shape == (3, 384)
    assert np.allclose(served_vectors, direct, atol=1e-5)
    assert response.usage.prompt_tokens > 0


def test_wrong_key_is_401_for_the_sdk(served):
    client = openai.OpenAI(base_url=served, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="hello")
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"


def test_missing_key_is_401_in_openai_shape(served):
    request = urllib.request.Request(
        served + "/embeddings",
        data=json.dumps({"model": "all-MiniLM-L6-v2", "input": "hello"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401
    assert json.loads(caught.value.read())["error"]["code"] == "invalid_api_key"


def test_bad_input_is_an_sdk_bad_request_error(served):
    client = openai.OpenAI(base_url=served, api_key="sk-e2e-key", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="")
    assert caught.value.body["param"] == "input"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

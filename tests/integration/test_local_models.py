"""The local models without torch: minilm-int8 (ONNX) and minilm-m2v (static, built by `embedsvc models build`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedsvc.adapters.providers import static_model
from embedsvc.config import DEFAULT_REGISTRY, ProviderSpec, Registry
from embedsvc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "eval"
REGISTRY = Registry.model_validate(DEFAULT_REGISTRY)
LOCAL = ProviderSpec(key="local", kind="local")


def verses(translation: str) -> dict[str, str]:
    """The fixture's real verses (the same 43 ids in both translations)."""
    path = FIXTURES / "bible" / "bible" / f"{translation}_verses.jsonl"
    return {v["id"]: v["text"] for v in map(json.loads, path.read_text().splitlines()) if v["text"].strip()}


def abstracts() -> list[str]:
    """SciFact abstracts as the evaluation embeds them (title + text): most run past the 256-token window."""
    lines = (FIXTURES / "scifact" / "corpus.jsonl").read_text().splitlines()
    return [f"{d['title']} {d['text']}" for d in map(json.loads, lines)]


def provider():
    from embedsvc.adapters.providers.local_model import LocalModelProvider

    return LocalModelProvider(LOCAL)


@pytest.fixture
def default_registry(aws, monkeypatch):
    """The service wired to the default registry (the local provider serves all three MiniLM models)."""
    from embedsvc.container import reset_settings

    monkeypatch.delenv("EMBEDSVC_REGISTRY", raising=False)
    reset_settings()
    yield
    reset_settings()


@pytest.mark.slow
def test_int8_vectors_are_the_torch_models_within_quantisation_error():
    from embedsvc.adapters.providers.local_model import load_tokenizer

    texts = list(verses("bsb").values())[:20] + abstracts()
    lengths = [len(ids) for ids in load_tokenizer()(texts)["input_ids"]]
    assert max(lengths) > 256  # the window's truncation is part of what is compared
    torch_vectors = provider().embed(texts, "all-MiniLM-L6-v2").vectors
    int8_vectors = provider().embed(texts, "all-MiniLM-L6-v2-int8").vectors
    cosines = np.sum(torch_vectors * int8_vectors, axis=1)
    assert cosines.mean() >= 0.999 and cosines.min() >= 0.99, cosines
    # truncated like sentence-transformers: a text's words past token 256 do not change its vector
    long = abstracts()[int(np.argmax(lengths[20:]))]
    padded = provider().embed([long, long + " unrelated words about bananas" * 20], "all-MiniLM-L6-v2-int8")
    assert np.allclose(padded.vectors[0], padded.vectors[1], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["minilm-int8", "minilm-m2v"])
def test_vectors_have_the_registered_size_and_unit_length(key):
    spec = REGISTRY.model(key)
    texts = list(verses("kjv").values())[:10]
    vectors = provider().embed(texts, spec.endpoints[0].model_name).vectors
    assert vectors.dtype == np.float32
    assert vectors.shape == (10, {"minilm-int8": 384, "minilm-m2v": 256}[key]) == (10, spec.dimensions)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # input order is kept (the ONNX backend sorts by length inside)
    single = provider().embed([texts[3]], spec.endpoints[0].model_name).vectors
    assert np.allclose(single[0], vectors[3], atol=1e-5)


@pytest.mark.slow
def test_the_static_model_is_served_through_the_embedding_service(default_registry):
    from embedsvc import container
    from embedsvc.observability import CallContext
    from embedsvc.services.tokens import count_tokens

    bsb, kjv = verses("bsb"), verses("kjv")
    ids = sorted(bsb.keys() & kjv.keys())
    service = container.embedding_service()
    modern = service.embed([bsb[i] for i in ids], "minilm-m2v", context=CallContext(source="test"))
    old = service.embed([kjv[i] for i in ids], "minilm-m2v-256", context=CallContext(source="test"))
    assert modern.model.key == "minilm-m2v" and modern.model.name == "minilm-m2v-256"
    assert modern.vectors.shape == (len(ids), 256)
    assert modern.prompt_tokens == sum(count_tokens(modern.model, [bsb[i] for i in ids]))
    assert np.allclose(modern.vectors, static_model.load().encode([bsb[i] for i in ids]), atol=1e-6)
    # weaker, but a model: a verse's other translation is its nearest neighbour far above chance (1/43)
    nearest = np.argmax(modern.vectors @ old.vectors.T, axis=1)
    assert np.mean(nearest == np.arange(len(ids))) > 0.5


def test_an_unbuilt_static_model_says_to_run_the_build(default_registry, monkeypatch, tmp_path):
    from embedsvc import container
    from embedsvc.observability import CallContext

    monkeypatch.setenv("EMBEDSVC_MODELS_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="run `embedsvc models build`"):
        container.embedding_service().embed(["Jesus wept."], "minilm-m2v", context=CallContext(source="test"))


def test_models_build_distills_once_and_marks_a_finished_build(monkeypatch, tmp_path, capsys):
    import model2vec.distill

    from embedsvc.adapters.providers.local_model import model_path
    from embedsvc.cli import main

    calls: list[dict] = []

    class Distilled:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_bytes(b"weights")

    def fake_distill(**kwargs):
        calls.append(kwargs)
        return Distilled()

    monkeypatch.setattr(model2vec.distill, "distill", fake_distill)
    monkeypatch.setenv("EMBEDSVC_MODELS_DIR", str(tmp_path))
    # a directory left by an interrupted build has no marker: it is rebuilt, not taken as built
    (tmp_path / "minilm-m2v").mkdir()
    (tmp_path / "minilm-m2v" / "model.safetensors").write_bytes(b"half")

    assert main(["models", "build"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["built"] == ["minilm-m2v-256"]
    assert calls == [{"model_name": str(model_path()), "pca_dims": 256}]
    assert "distilling" in err and "built in" in err
    built = tmp_path / "minilm-m2v"
    assert (built / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((built / static_model.MARKER).read_text())["pca_dims"] == 256
    assert not (tmp_path / "minilm-m2v.building").exists()

    assert main(["models", "build"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["skipped"] == ["minilm-m2v-256"] and len(calls) == 1
    assert "already built" in err


@pytest.mark.slow
def test_the_int8_model_and_its_token_counts_do_not_import_torch():
    script = """
import sys
from embedsvc.adapters.providers.local_model import LocalModelProvider
from embedsvc.config import DEFAULT_REGISTRY, ProviderSpec, Registry
from embedsvc.services.tokens import count_tokens

vectors = LocalModelProvider(ProviderSpec(key="local", kind="local")).embed(
    ["In the beginning God created the heavens and the earth."], "all-MiniLM-L6-v2-int8"
).vectors
assert vectors.shape == (1, 384), vectors.shape
spec = Registry.model_validate(DEFAULT_REGISTRY).model("minilm-int8")
assert count_tokens(spec, ["hello world"]) == [4]  # exact: MiniLM's own WordPiece, not the estimate
assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch was imported"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "layers" / "embedsvc"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

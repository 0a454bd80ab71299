"""The committed openapi.json is the document the code generates (run `make openapi` after API changes)."""

from __future__ import annotations

import json
from pathlib import Path

from embedsvc.openapi import openapi_document

COMMITTED = Path(__file__).resolve().parents[2] / "openapi.json"


def test_openapi_json_matches_the_code():
    assert json.loads(COMMITTED.read_text()) == openapi_document(), (
        "openapi.json is stale: run `make openapi`"
    )


def test_openapi_documents_the_embeddings_route_and_its_errors():
    document = openapi_document()
    operation = document["paths"]["/v1/embeddings"]["post"]
    assert {"200", "400", "401", "429", "503"} <= set(operation["responses"])
    schema = document["components"]["schemas"]["EmbeddingRequest"]
    assert {"input", "model"} <= set(schema["required"])

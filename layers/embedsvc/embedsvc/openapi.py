"""Print the API's OpenAPI document, generated from the handler's routes and pydantic models.

`make openapi` writes it to openapi.json; a contract test fails when the two differ.
"""

from __future__ import annotations

import json
import sys

from embedsvc.local.stack import ROOT


def openapi_document() -> dict:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer

    from functions.api.app import app

    schema = app.get_openapi_json_schema(
        title="Embedding service",
        version="1.0.0",
        summary="OpenAI-compatible embeddings for AWS serverless",
        description="Send text, get vectors. Authenticate with 'Authorization: Bearer <key>'.",
        security_schemes={"bearerAuth": HTTPBearer(description="an API key from `embedsvc keys create`")},
        security=[{"bearerAuth": []}],
    )
    return json.loads(schema)


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))

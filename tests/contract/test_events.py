"""Every sample event in events/ parses with the model its handler uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent, SQSEvent
from aws_lambda_powertools.utilities.data_classes.api_gateway_authorizer_event import (
    APIGatewayAuthorizerTokenEvent,
)

from embedsvc.config import DEFAULT_REGISTRY, Settings
from embedsvc.models.api import EmbeddingRequest
from embedsvc.services.indexing import PermanentError, parse_message

EVENTS = Path(__file__).resolve().parents[2] / "events"
SETTINGS = Settings.model_validate({"registry": DEFAULT_REGISTRY})


def events(folder: str) -> list[Path]:
    found = sorted((EVENTS / folder).glob("*.json"))
    assert found, f"no sample events in events/{folder}"
    return found


def test_every_event_folder_belongs_to_a_function():
    functions = {p.name for p in (EVENTS.parent / "functions").iterdir() if p.is_dir()}
    assert {p.name for p in EVENTS.iterdir() if p.is_dir()} <= functions


@pytest.mark.parametrize("path", events("api"), ids=lambda p: p.name)
def test_api_events_parse(path):
    event = APIGatewayProxyEvent(json.loads(path.read_text()))
    assert event.http_method == "POST" and event.path == "/v1/embeddings"
    assert event.request_context.authorizer.raw_event["tenant_id"]
    request = EmbeddingRequest.model_validate_json(event.body)
    assert request.inputs()


@pytest.mark.parametrize("path", events("authorizer"), ids=lambda p: p.name)
def test_authorizer_events_parse(path):
    event = APIGatewayAuthorizerTokenEvent(json.loads(path.read_text()))
    assert event.get_type == "TOKEN"
    assert event.parsed_arn.api_id


@pytest.mark.parametrize("path", events("embed_worker"), ids=lambda p: p.name)
def test_worker_events_parse_and_poison_is_named(path):
    records = list(SQSEvent(json.loads(path.read_text())).records)
    assert records
    outcomes = []
    for record in records:
        try:
            parse_message(record.body, SETTINGS)
            outcomes.append("ok")
        except PermanentError:
            outcomes.append("poison")
    if "poison" in path.name:
        assert outcomes.count("poison") == 1 and "ok" in outcomes
    else:
        assert set(outcomes) == {"ok"}

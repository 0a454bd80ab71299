"""The TOKEN authorizer against hashed keys in DynamoDB (moto)."""

from __future__ import annotations

import pytest

from embedsvc.local.lambda_context import LocalLambdaContext
from embedsvc.services.auth import hash_api_key
from tests.conftest import TEST_ENV, load_event


@pytest.fixture
def keys(aws):
    from embedsvc import container

    return container.api_keys()


def authorize(token: str) -> dict:
    from functions.authorizer.app import lambda_handler

    event = load_event("authorizer/token_valid.json")
    event["authorizationToken"] = token
    return lambda_handler(event, LocalLambdaContext("authorizer"))


def test_valid_key_is_allowed_with_tenant_and_user_context(keys):
    key = keys.create(tenant_id="tenant-a", user_id="user-9", name="ci")
    policy = authorize(f"Bearer {key}")
    assert policy["principalId"] == "user-9"
    assert policy["context"] == {"tenant_id": "tenant-a", "user_id": "user-9"}
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Allow"


def test_keys_are_stored_only_as_hashes(keys):
    from embedsvc.adapters.aws import client

    key = keys.create(tenant_id="t", user_id="u")
    items = client("dynamodb").scan(TableName=TEST_ENV["API_KEYS_TABLE"])["Items"]
    assert [i["key_hash"]["S"] for i in items] == [hash_api_key(key)]
    assert key not in str(items)


@pytest.mark.parametrize("token", ["Bearer sk-wrong", "sk-no-scheme", "Basic abc", "", "Bearer "])
def test_wrong_or_malformed_key_is_unauthorized(keys, token):
    keys.create(tenant_id="t", user_id="u", key="sk-right")
    with pytest.raises(Exception, match="^Unauthorized$"):
        authorize(token)


def test_revoked_key_is_unauthorized(keys):
    key = keys.create(tenant_id="t", user_id="u")
    keys.revoke(key)
    with pytest.raises(Exception, match="^Unauthorized$"):
        authorize(f"Bearer {key}")


def test_sample_event_without_bearer_is_rejected(keys):
    from functions.authorizer.app import lambda_handler

    with pytest.raises(Exception, match="^Unauthorized$"):
        lambda_handler(load_event("authorizer/token_missing_bearer.json"), LocalLambdaContext("authorizer"))

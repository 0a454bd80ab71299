"""API keys: random bearer tokens, stored only as SHA-256 hashes, each mapped to a tenant and user.

SHA-256 (not a slow password hash) is right here: keys are 256-bit random strings, so there is nothing
to brute-force, and the authorizer must stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from embedsvc.errors import Unauthorized

KEY_PREFIX = "sk-"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    user_id: str
    key_name: str = ""


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_token(header: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` header; 401 if absent or malformed."""
    if not header:
        raise Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Malformed Authorization header; expected 'Bearer <key>'.")
    return token.strip()


class ApiKeyStore:
    def __init__(self, table_name: str, client):
        self.table_name = table_name
        self.client = client

    def create(self, *, tenant_id: str, user_id: str, name: str = "", key: str | None = None) -> str:
        """Register a key (a new random one unless given) and return it; only its hash is stored."""
        from embedsvc.errors import InvalidRequest
        from embedsvc.models.names import MAX_TAG_LENGTH

        for name, value in (("tenant", tenant_id), ("user", user_id)):
            # They travel in queue messages, cost records and (for private content) point ids: bounded.
            if not value or len(value) > MAX_TAG_LENGTH:
                raise InvalidRequest(f"{name} id must have 1 to {MAX_TAG_LENGTH} characters", param=name)
        key = key or generate_api_key()
        self.client.put_item(
            TableName=self.table_name,
            Item={
                "key_hash": {"S": hash_api_key(key)},
                "tenant_id": {"S": tenant_id},
                "user_id": {"S": user_id},
                "name": {"S": name},
                "created_at": {"S": datetime.now(UTC).isoformat()},
            },
        )
        return key

    def revoke(self, key: str) -> None:
        self.client.delete_item(TableName=self.table_name, Key={"key_hash": {"S": hash_api_key(key)}})

    def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal behind a bearer key; Unauthorized if unknown or revoked."""
        key = bearer_token(authorization_header)
        item = self.client.get_item(
            TableName=self.table_name, Key={"key_hash": {"S": hash_api_key(key)}}, ConsistentRead=True
        ).get("Item")
        if not item or item.get("disabled", {}).get("BOOL"):
            # Never echo the key back: it would land in logs.
            raise Unauthorized("Incorrect API key provided.")
        return Principal(item["tenant_id"]["S"], item["user_id"]["S"], item.get("name", {}).get("S", ""))


def create_api_keys_table(client, table_name: str) -> None:
    """Create the API keys table as template.yaml does (local stack, tests); no-op if it exists."""
    with contextlib.suppress(client.exceptions.ResourceInUseException):
        client.create_table(
            TableName=table_name,
            KeySchema=[{"AttributeName": "key_hash", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "key_hash", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )

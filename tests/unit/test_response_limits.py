"""The worst-case size bound behind the API's inputs-per-answer limit."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedsvc.models.api import MAX_INPUTS
from embedsvc.services.response_limits import (
    LAMBDA_RESPONSE_LIMIT_BYTES,
    MAX_FLOAT32_JSON_CHARS,
    item_bytes_bound,
    max_inputs_per_response,
    response_bytes_bound,
)


def float32_texts(values: np.ndarray) -> list[bytes]:
    return orjson.dumps(values.astype(np.float32), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")


def test_the_longest_float32_texts_are_16_characters():
    worst = np.array([-0.0000127660915, -1030958800000.0, -1.10696785e-36], dtype=np.float32)
    assert [len(t) for t in float32_texts(worst)] == [16, 16, 15]
    assert MAX_FLOAT32_JSON_CHARS == 16


def test_no_float32_is_written_longer_than_the_bound():
    # Every binade, both signs, random mantissas (the full 2^32 sweep was run once; this guards orjson).
    rng = np.random.default_rng(7)
    exponents = np.repeat(np.arange(255, dtype=np.uint32), 2000)
    bits = (exponents << np.uint32(23)) | rng.integers(0, 2**23, exponents.size, dtype=np.uint32)
    bits = np.concatenate([bits, bits | np.uint32(1 << 31)])
    assert max(len(t) for t in float32_texts(bits.view(np.float32))) <= MAX_FLOAT32_JSON_CHARS


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_the_item_bound_is_the_escaped_item_at_its_widest(fmt):
    vector = np.full(7, np.float32(-0.0000127660915), dtype=np.float32)
    embedding = vector.tobytes() if fmt == "base64" else vector
    if fmt == "base64":
        import base64

        embedding = base64.b64encode(embedding).decode()
    item = orjson.dumps(
        {"object": "embedding", "index": MAX_INPUTS - 1, "embedding": embedding},
        option=orjson.OPT_SERIALIZE_NUMPY,
    ).decode()
    assert (
        item_bytes_bound(7, fmt) == len(json.dumps(item)) - 2 + 1
    )  # escaped in the proxy JSON, plus a comma


@pytest.mark.parametrize(
    ("name", "dims", "float_", "base64_"),
    [
        ("text-embedding-3-small", 1536, 240, 762),
        ("text-embedding-3-large", 3072, 120, 382),
        ("all-MiniLM-L6-v2", 384, 955, 2048),
    ],
)
def test_the_registry_models_limits(name, dims, float_, base64_):
    assert max_inputs_per_response(dims, "float", name) == float_
    assert max_inputs_per_response(dims, "base64", name) == base64_


@settings(max_examples=60, derandomize=True)
@given(dims=st.integers(1, 4096), fmt=st.sampled_from(["float", "base64"]))
def test_the_limit_is_the_largest_count_whose_bound_fits(dims, fmt):
    n = max_inputs_per_response(dims, fmt, "m")
    assert response_bytes_bound(n, dims, fmt, "m") <= LAMBDA_RESPONSE_LIMIT_BYTES
    assert n == MAX_INPUTS or response_bytes_bound(n + 1, dims, fmt, "m") > LAMBDA_RESPONSE_LIMIT_BYTES
    assert max_inputs_per_response(dims, "base64", "m") >= max_inputs_per_response(dims, "float", "m")


def test_a_model_name_needing_escapes_is_counted_escaped_twice():
    assert response_bytes_bound(0, 8, "float", 'a"b') > response_bytes_bound(0, 8, "float", "abc")

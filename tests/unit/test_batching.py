"""Request splitting at the provider's limits: inputs per request, tokens per request, tokens per input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedsvc.errors import InvalidRequest
from embedsvc.services.batching import RequestLimits, split_requests

OPENAI = RequestLimits(max_inputs=2048, max_tokens=300_000, max_input_tokens=8192)


@pytest.mark.parametrize(
    ("counts", "limits", "expected"),
    [
        ([], OPENAI, []),
        ([5], OPENAI, [(0,)]),
        ([1] * 2048, OPENAI, [tuple(range(2048))]),
        ([1] * 2049, OPENAI, [tuple(range(2048)), (2048,)]),
        ([1] * 4097, OPENAI, [tuple(range(2048)), tuple(range(2048, 4096)), (4096,)]),
        # 37 inputs of 8,192 tokens = 303,104 > 300,000: the 37th starts a new request.
        ([8192] * 37, OPENAI, [tuple(range(36)), (36,)]),
        ([150_000 - 8192, 8192, 1], RequestLimits(10, 150_000, 150_000), [(0, 1), (2,)]),
        ([3, 3, 3], RequestLimits(2, 100, 10), [(0, 1), (2,)]),
        ([6, 5, 1], RequestLimits(10, 10, 10), [(0,), (1, 2)]),
    ],
)
def test_split_table(counts, limits, expected):
    assert [c.indices for c in split_requests(counts, limits)] == expected


def test_chunk_tokens_are_summed():
    chunks = split_requests([8192] * 37, OPENAI)
    assert [c.tokens for c in chunks] == [8192 * 36, 8192]


def test_input_over_the_per_input_limit_is_rejected_with_its_index():
    with pytest.raises(InvalidRequest) as caught:
        split_requests([10, 8193], OPENAI)
    assert "Input 1 has 8193 tokens" in caught.value.message
    assert caught.value.param == "input"


@given(
    counts=st.lists(st.integers(min_value=1, max_value=50), max_size=300),
    max_inputs=st.integers(min_value=1, max_value=40),
    max_tokens=st.integers(min_value=50, max_value=400),
)
def test_split_properties(counts, max_inputs, max_tokens):
    limits = RequestLimits(max_inputs, max_tokens, 50)
    chunks = split_requests(counts, limits)
    # Order kept, nothing lost or duplicated.
    assert [i for c in chunks for i in c.indices] == list(range(len(counts)))
    for chunk in chunks:
        assert 1 <= len(chunk.indices) <= max_inputs
        assert chunk.tokens == sum(counts[i] for i in chunk.indices) <= max_tokens
    # Greedy minimality: each chunk was closed only because the next input would not fit.
    for current, following in zip(chunks, chunks[1:], strict=False):
        nxt = counts[following.indices[0]]
        assert len(current.indices) == max_inputs or current.tokens + nxt > max_tokens

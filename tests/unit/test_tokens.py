"""Token counting: exact with cl100k_base for text-embedding-3, the model's tokenizer for local models."""

from __future__ import annotations

import pytest

from embedsvc.config import DEFAULT_REGISTRY, Registry
from embedsvc.services.tokens import count_tokens, estimate_tokens, truncate_to_limit

REGISTRY = Registry.model_validate(DEFAULT_REGISTRY)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Reference counts from OpenAI's tokenizer (cl100k_base).
        ("hello world", 2),
        ("In the beginning God created the heavens and the earth.", 11),
        ("tiktoken is great!", 6),
    ],
)
def test_cl100k_counts_exactly(text, expected):
    assert count_tokens(REGISTRY.model("te3s"), [text]) == [expected]


@pytest.mark.parametrize(("text", "expected"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("é" * 4, 2)])
def test_estimate_is_a_quarter_token_per_utf8_byte(text, expected):
    assert estimate_tokens(text) == expected


def test_local_model_counts_with_its_own_tokenizer_including_special_tokens():
    # BERT word pieces: [CLS] hello world [SEP]
    assert count_tokens(REGISTRY.model("minilm"), ["hello world"]) == [4]


def test_truncation_cuts_cl100k_text_to_the_limit():
    spec = REGISTRY.model("te3s")
    text = "word " * 9000
    (count,) = count_tokens(spec, [text])
    cut, cut_count = truncate_to_limit(spec, text, count)
    assert cut_count == 8192
    assert count_tokens(spec, [cut]) == [8192]
    assert text.startswith(cut)

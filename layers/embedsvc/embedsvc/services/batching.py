"""Pure request splitting: pack inputs into as few provider requests as a model's limits allow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embedsvc.errors import InvalidRequest


@dataclass(frozen=True)
class RequestLimits:
    max_inputs: int
    max_tokens: int
    max_input_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One provider request: positions into the caller's input list and their token total."""

    indices: tuple[int, ...]
    tokens: int


def split_requests(token_counts: Sequence[int], limits: RequestLimits) -> list[Chunk]:
    """Greedy, order-preserving packing under the per-request input and token limits.

    Order is kept so a response maps back by position. Greedy in order is optimal here: every chunk
    but the last is closed only because the next input would break a limit.
    """
    if limits.max_inputs < 1 or limits.max_tokens < 1:
        raise ValueError("limits must be positive")
    chunks: list[Chunk] = []
    current: list[int] = []
    current_tokens = 0
    for index, tokens in enumerate(token_counts):
        if tokens > limits.max_input_tokens or tokens > limits.max_tokens:
            raise InvalidRequest(
                f"Input {index} has {tokens} tokens; this model accepts at most {limits.max_input_tokens} per input.",
                param="input",
            )
        if current and (len(current) == limits.max_inputs or current_tokens + tokens > limits.max_tokens):
            chunks.append(Chunk(tuple(current), current_tokens))
            current, current_tokens = [], 0
        current.append(index)
        current_tokens += tokens
    if current:
        chunks.append(Chunk(tuple(current), current_tokens))
    return chunks

"""The API's own request limits, checked before the cache or any provider is asked.

Beyond each model's per-input limit, an API request is bounded by what its answer can carry (one
Lambda response) and by OpenAI's cap on the tokens of one request, which applies to every model here.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedsvc.config import ModelSpec
from embedsvc.errors import InvalidRequest
from embedsvc.models.api import EncodingFormat
from embedsvc.services.response_limits import max_inputs_per_response
from embedsvc.services.tokens import count_tokens

# Special tokens a tokenizer may add to each input ([CLS] and [SEP] for MiniLM).
SPECIAL_TOKENS_PER_INPUT = 2


def check_answer_fits(spec: ModelSpec, dimensions: int, encoding_format: EncodingFormat, count: int) -> None:
    """A 400 naming the limit when the answer for `count` inputs could exceed Lambda's response size."""
    limit = max_inputs_per_response(dimensions, encoding_format, spec.name)
    if count <= limit:
        return
    advice = ""
    if encoding_format == "float":
        advice = f", or ask for encoding_format 'base64' ({max_inputs_per_response(dimensions, 'base64', spec.name)})"
    raise InvalidRequest(
        f"'input' has {count} items, but at most {limit} '{spec.name}' embeddings of {dimensions} dimensions "
        f"fit in one answer as '{encoding_format}' (an API answer is at most 6 MB). Send at most {limit} "
        f"inputs per request (LangChain: chunk_size, LlamaIndex: embed_batch_size){advice}.",
        param="input",
    )


def check_tokens_per_input(spec: ModelSpec, counts: Sequence[int]) -> None:
    """A 400 for the first input over the model's per-input limit, by counts the caller already knows."""
    for index, count in enumerate(counts):
        if count > spec.max_input_tokens:
            raise InvalidRequest(
                f"'input[{index}]' has {count} tokens; '{spec.name}' accepts at most {spec.max_input_tokens}.",
                param="input",
            )


def check_total_tokens(
    spec: ModelSpec, texts: Sequence[str], max_total: int, counts: Sequence[int] | None = None
) -> None:
    """A 400 naming the counted and allowed totals when the request holds more than `max_total` tokens."""
    if counts is None:
        # Every token covers at least one UTF-8 byte (plus the special ones): a request with fewer bytes
        # than the cap cannot pass it, so most requests are not tokenized once more just for this check.
        if sum(len(text.encode("utf-8")) + SPECIAL_TOKENS_PER_INPUT for text in texts) <= max_total:
            return
        counts = count_tokens(spec, texts)
    total = sum(counts)
    if total > max_total:
        raise InvalidRequest(
            f"'input' has {total:,} tokens in total; at most {max_total:,} are allowed per request. "
            "Send the inputs in several requests.",
            param="input",
        )

"""Token-id inputs: arrays of cl100k_base ids, as OpenAI accepts them and LangChain sends them by default.

The providers behind the service take text, so ids are decoded back to text for every model (as
LiteLLM's proxy does); a cl100k_base model re-tokenizes that text to the same or nearly the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import TypeIs

from embedsvc.errors import InvalidRequest
from embedsvc.services.tokens import _cl100k

# Ids 0..100255 are cl100k_base's text tokens; above them lie special tokens and unused ids, which no
# client tokenizing text (encode_ordinary, LangChain's default) ever produces.
CL100K_TEXT_TOKENS = 100_256


def is_token_inputs(inputs: list[str] | list[list[int]]) -> TypeIs[list[list[int]]]:
    """True when the inputs are token-id arrays rather than texts."""
    return bool(inputs) and not isinstance(inputs[0], str)


def decode_token_inputs(inputs: Sequence[Sequence[int]]) -> list[str]:
    """The text of each token-id array; a 400 naming the first empty array or id cl100k_base lacks."""
    encoding = _cl100k()
    texts = []
    for index, ids in enumerate(inputs):
        if not ids:
            raise InvalidRequest(f"'input[{index}]' is an empty array of token ids.", param="input")
        if min(ids) < 0 or max(ids) >= CL100K_TEXT_TOKENS:  # one pass in C before a slow search
            position = next(p for p, token in enumerate(ids) if not 0 <= token < CL100K_TEXT_TOKENS)
            raise InvalidRequest(
                f"'input[{index}][{position}]' is not a cl100k_base token id "
                f"(ids run from 0 to {CL100K_TEXT_TOKENS - 1}).",
                param="input",
            )
        # decode() replaces a character cut in two (LangChain cuts long texts every 8,191 ids) with U+FFFD.
        texts.append(encoding.decode(list(ids)))
    return texts

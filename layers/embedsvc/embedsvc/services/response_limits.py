"""How many embeddings fit in one API answer: a worst-case bound on the bytes Lambda returns.

A buffered Lambda answer may be at most 6,291,556 bytes, measured on what the runtime sends: the API
Gateway proxy response serialized as JSON, whose `body` is the embeddings JSON as a string inside it
(so each of its quotes is escaped). Past that limit the function has already paid the provider and
API Gateway answers 502, so the API refuses such a request before doing any work. The bound is exact
in its structure and worst-case in its numbers: every float takes the longest text orjson writes for
any float32, every index its most digits.
"""

from __future__ import annotations

import json
import math

from embedsvc.models.api import MAX_INPUTS, EncodingFormat

LAMBDA_RESPONSE_LIMIT_BYTES = 6_291_556  # 6 MiB + 100 bytes, the runtime's limit for a buffered answer

# The longest text orjson (OPT_SERIALIZE_NUMPY) writes for a float32: 16 characters, e.g.
# -0.0000127660915 or -1030958800000.0; checked over all 2^32 bit patterns (NaN and inf are `null`).
MAX_FLOAT32_JSON_CHARS = 16

# What is not per item: the proxy response's keys, status and headers, the body's outer keys and usage
# counts. About 300 bytes today (tests measure it); the rest is room for a few more headers.
ENVELOPE_RESERVE_BYTES = 1024


def _in_json_string(fragment: str) -> int:
    """Bytes `fragment` takes once written inside a JSON string (quotes and backslashes escaped)."""
    return len(json.dumps(fragment)) - 2


def item_bytes_bound(
    dimensions: int, encoding_format: EncodingFormat, max_index: int = MAX_INPUTS - 1
) -> int:
    """The most bytes one embedding object takes in the serialized answer, its separating comma included."""
    if encoding_format == "base64":
        vector = '"' + "A" * (4 * math.ceil(4 * dimensions / 3)) + '"'  # float32 bytes, base64-padded
    else:
        vector = "[" + ",".join(["0" * MAX_FLOAT32_JSON_CHARS] * dimensions) + "]"
    item = '{"object":"embedding","index":' + str(max_index) + ',"embedding":' + vector + "},"
    return _in_json_string(item)


def response_bytes_bound(
    count: int, dimensions: int, encoding_format: EncodingFormat, model_name: str
) -> int:
    """An upper bound on the serialized Lambda answer carrying `count` embeddings."""
    # The model name is written twice escaped (once by orjson into the body, once by the runtime).
    name = len(json.dumps(json.dumps(model_name)))
    return ENVELOPE_RESERVE_BYTES + name + count * item_bytes_bound(dimensions, encoding_format)


def max_inputs_per_response(
    dimensions: int,
    encoding_format: EncodingFormat,
    model_name: str,
    limit_bytes: int = LAMBDA_RESPONSE_LIMIT_BYTES,
) -> int:
    """The most inputs (up to MAX_INPUTS) whose answer, at these dimensions and encoding, fits the limit."""
    room = limit_bytes - response_bytes_bound(0, dimensions, encoding_format, model_name)
    return max(0, min(MAX_INPUTS, room // item_bytes_bound(dimensions, encoding_format)))

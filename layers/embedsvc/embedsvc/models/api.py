"""API bodies: the OpenAI embeddings request and response, and the model list."""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

MAX_INPUTS = 2048  # OpenAI's per-request input limit, kept so clients see identical behaviour
MAX_TOTAL_TOKENS = 300_000  # OpenAI's per-request token limit, summed over the inputs, for every model

EncodingFormat = Literal["float", "base64"]
TokenIds = list[StrictInt]


def _input_shape_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("input_shape", message)


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, as OpenAI defines it: text, or arrays of cl100k_base token ids."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients may send fields we ignore

    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description=(
            "A string, an array of up to 2,048 non-empty strings, an array of cl100k_base token ids, or an "
            "array of such arrays (what LangChain's OpenAIEmbeddings sends by default)."
        ),
        examples=["The Lord is my shepherd.", ["In the beginning", "Jesus wept."], [791, 10570, 374]],
    )
    model: StrictStr = Field(
        description="A registered model: its public name or its key.", examples=["text-embedding-3-small"]
    )
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(default=None, gt=0, description="Only for models that support shortening.")
    user: str | None = Field(
        default=None, description="Accepted for compatibility; the user is the API key's principal."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _one_kind_of_input(cls, value: Any) -> Any:
        """Say which item is wrong, instead of pydantic's four-branch union error."""
        if not isinstance(value, list) or not value:
            return value  # a string, an empty list (the service names it) or a wrong type (the union says)
        for index, item in enumerate(value):
            if isinstance(item, list):
                for position, token in enumerate(item):
                    if not _is_int(token):
                        raise _input_shape_error(f"'input[{index}][{position}]' must be an integer token id.")
            elif not isinstance(item, str) and not _is_int(item):
                raise _input_shape_error(
                    f"'input[{index}]' must be a string, a token id or an array of token ids."
                )
        kinds = {_kind(item) for item in value}
        if len(kinds) > 1:
            raise _input_shape_error(
                "'input' mixes " + " and ".join(sorted(kinds)) + "; send one kind of input per request."
            )
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: of texts, or of token-id arrays (one flat array of ids is one input)."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [cast(list[int], value)]
        return cast("list[str] | list[list[int]]", list(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a token id


def _kind(item: Any) -> str:
    if isinstance(item, str):
        return "strings"
    return "token-id arrays" if isinstance(item, list) else "token ids"


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class ModelLimits(BaseModel):
    """What one request to a model may hold; the response limit is Lambda's 6 MB answer."""

    max_inputs_per_request: int
    max_input_tokens: int = Field(description="Tokens per input, counted by the model's tokenizer.")
    max_total_tokens: int = Field(description="Tokens per request, summed over its inputs.")
    max_inputs_per_response: dict[str, int] = Field(
        description="By encoding_format, at the model's full dimensions: the most inputs whose answer fits."
    )


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    key: str
    dimensions: int
    limits: ModelLimits


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

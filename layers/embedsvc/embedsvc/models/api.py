"""API bodies: the OpenAI embeddings request and response."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

MAX_INPUTS = 2048  # OpenAI's per-request input limit, kept so clients see identical behaviour


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, as OpenAI defines it (token-array inputs are not accepted)."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients may send fields we ignore

    input: StrictStr | list[StrictStr] = Field(
        description="A string or an array of up to 2,048 non-empty strings."
    )
    model: StrictStr = Field(description="A registered model: its public name or its key.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0, description="Only for models that support shortening.")
    user: str | None = Field(
        default=None, description="Accepted for compatibility; the user is the API key's principal."
    )

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


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


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

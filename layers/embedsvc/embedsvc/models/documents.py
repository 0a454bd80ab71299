"""API bodies of the content routes: `/v1/documents` (write-through) and `/v1/search`."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

from embedsvc.errors import InvalidRequest
from embedsvc.models.names import CONTENT_TYPE_PATTERN

MAX_DOCUMENT_ID_LENGTH = 512  # as IndexMessage's id: every document can be asked for by id on the queue
MAX_QUERY_CHARS = 8192
MAX_TOP_K = 100
MAX_FILTERS = 16
MAX_FILTER_VALUES = 100


def storable(value: str) -> str:
    """Refuse what Postgres cannot store: NUL characters and lone surrogates (half an emoji, not Unicode)."""
    if "\x00" in value:
        raise ValueError("contains a NUL character, which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return value


def _storable_json(value: Any) -> Any:
    if isinstance(value, str):
        storable(value)
    elif isinstance(value, float) and not math.isfinite(value):
        # Python's JSON parser takes NaN and Infinity (and 1e400); JSON and Postgres's jsonb do not.
        raise ValueError("holds NaN or Infinity, which JSON cannot carry")
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key)
            _storable_json(item)
    elif isinstance(value, list):
        for item in value:
            _storable_json(item)
    return value


ContentType = Annotated[str, StringConstraints(pattern=CONTENT_TYPE_PATTERN)]
DocumentId = Annotated[
    StrictStr, StringConstraints(min_length=1, max_length=MAX_DOCUMENT_ID_LENGTH), AfterValidator(storable)
]
Text = Annotated[StrictStr, AfterValidator(storable)]
Metadata = Annotated[
    dict[str, Any],
    AfterValidator(_storable_json),
    Field(description="Any JSON object (8 KiB at most as JSON); search `filters` match its keys."),
]
# As the vector store's metadata filter keys; checked here too, so a bad key costs no query embedding.
FilterKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,64}$")]
FilterScalar = StrictStr | StrictInt | StrictFloat | StrictBool  # finite: see SearchRequest._plain_values
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(min_length=1, max_length=MAX_FILTER_VALUES)]
Include = Literal["text", "metadata"]
WriteIndexing = Literal["indexed", "queued", "pending_repair"]
CollectionIndexing = Literal["indexed", "stale", "missing", "deleted", "pending_delete", "unknown"]


def _plain(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int))  # bool is an int


def document_id_from_path(raw: str) -> str:
    """The id in a request path, decoded: API Gateway (REST) passes the path percent-encoded as sent."""
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "The document id in the path is not percent-encoded UTF-8.", param="document_id"
        ) from None
    if len(value) > MAX_DOCUMENT_ID_LENGTH:
        raise InvalidRequest(
            f"The document id has {len(value)} characters; at most {MAX_DOCUMENT_ID_LENGTH} are allowed.",
            param="document_id",
        )
    try:
        return storable(value)
    except ValueError as exc:
        raise InvalidRequest(f"The document id {exc}.", param="document_id") from None


class DocumentBody(BaseModel):
    """`PUT /v1/documents/{content_type}/{document_id}`: the document's full text and metadata."""

    model_config = ConfigDict(extra="forbid")

    text: Text = Field(
        description="The text to store and embed: not blank, at most 100,000 characters, no NUL.",
        examples=["In the beginning God created the heaven and the earth."],
    )
    metadata: Metadata = Field(default_factory=dict, examples=[{"book": "Genesis", "chapter": 1}])


class ImportDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: DocumentId
    text: Text
    metadata: Metadata = Field(default_factory=dict)


class ImportRequest(BaseModel):
    """`POST /v1/documents/{content_type}:import`: many documents, committed together."""

    model_config = ConfigDict(extra="forbid")

    documents: list[ImportDocument] = Field(
        description="One to 1,000 documents with distinct ids; all are committed, or none."
    )


class SearchRequest(BaseModel):
    """`POST /v1/search`: the nearest documents of one content type to a query text."""

    model_config = ConfigDict(extra="forbid")

    query: Text = Field(min_length=1, max_length=MAX_QUERY_CHARS, examples=["the Lord is my shepherd"])
    content_type: ContentType = Field(examples=["verse"])
    top_k: StrictInt = Field(default=10, ge=1, le=MAX_TOP_K)
    filters: dict[FilterKey, FilterValue] | None = Field(
        default=None,
        max_length=MAX_FILTERS,
        description=(
            "Metadata values the hits must have: a key (1-64 letters, digits or underscores) to one value, "
            "or to a list of values of which the hit must have one."
        ),
        examples=[{"book": ["Psalms", "John"]}],
    )
    include: list[Include] = Field(
        default_factory=list,
        max_length=2,
        description="Fields of each hit to return, read from the content store (the source of truth).",
    )

    @field_validator("filters", mode="before")
    @classmethod
    def _plain_values(cls, value: Any) -> Any:
        """Say which filter is wrong, instead of pydantic's error for each branch of the union."""
        if not isinstance(value, dict):
            return value
        for key, item in value.items():
            items = item if isinstance(item, list) else [item]
            if not items or not all(_plain(v) for v in items):
                raise PydanticCustomError(
                    "filter_value",
                    "filter '{key}' must be a string, finite number or boolean, or a list of one or more of them",
                    {"key": str(key)[:64]},
                )
        return value

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is blank")
        return value


class DocumentWriteResult(BaseModel):
    """The committed row after a PUT or DELETE, and how far its indexing got within the request."""

    object: Literal["document"] = "document"
    content_type: str
    id: str
    version: int = Field(description="Postgres's version of the row: every write makes a higher one.")
    updated_at: str = Field(description="When Postgres committed the write (ISO 8601).")
    deleted: bool
    indexing: WriteIndexing = Field(
        description=(
            "`indexed`: every collection holds this version; `queued`: the vector write failed and an index "
            "request is on the queue; `pending_repair`: the queue failed too, the hourly repair will index it."
        )
    )
    collections: list[str]


class Document(BaseModel):
    """A stored document and, per collection, how its point compares with it."""

    object: Literal["document"] = "document"
    content_type: str
    id: str
    text: str
    metadata: dict[str, Any]
    version: int
    updated_at: str
    indexing: dict[str, CollectionIndexing] = Field(
        description="By collection: Qdrant's point against the row (`unknown` when Qdrant did not answer)."
    )


class ImportResult(BaseModel):
    object: Literal["import"] = "import"
    content_type: str
    committed: int
    queued: int = Field(description="Documents whose index request is on the queue (bulk priority).")
    pending_repair: int = Field(description="Documents the queue refused: the hourly repair indexes them.")


class SearchHit(BaseModel):
    id: str
    score: float
    text: str | None = Field(default=None, description='With `include: ["text"]`.')
    metadata: dict[str, Any] | None = Field(default=None, description='With `include: ["metadata"]`.')


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    content_type: str
    model: str = Field(description="The model that embedded the query and the collection.")
    collection: str = Field(description="The collection searched (the content type's alias resolved).")
    data: list[SearchHit]

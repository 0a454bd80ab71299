"""S3 objects as local files: the EvaluationFunction reads its ground truth from `s3://bucket/key` URIs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Error codes that say the object cannot be read by this role at all: a retry cannot help.
UNREADABLE_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"})


class ObjectUnreadable(Exception):
    """The object is missing, or this role may not read it."""

    def __init__(self, uri: str, code: str):
        super().__init__(f"cannot read {uri}: {code}")
        self.uri = uri
        self.code = code


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an `s3://bucket/key` URI naming an object; ValueError for anything else."""
    bucket, _, key = uri.removeprefix("s3://").partition("/") if uri.startswith("s3://") else ("", "", "")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"'{uri}' is not an s3://bucket/key URI of a file")
    return bucket, key


def download(s3: Any, uri: str, into: Path) -> Path:
    """A local copy of the object at `uri` under `into`, keeping its bucket and key as the path."""
    bucket, key = split_uri(uri)
    path = into / bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3.download_file(bucket, key, str(path))
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in UNREADABLE_CODES:
            raise ObjectUnreadable(uri, code) from None
        raise
    return path

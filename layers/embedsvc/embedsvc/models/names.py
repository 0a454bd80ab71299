"""Names shared by every edge: content types (and so collection names) follow one pattern."""

from __future__ import annotations

import re

# A content type names collections (`{content_type}_{model_key}`) and CloudWatch dimensions, so it is
# restricted to what both accept: lowercase, starting with a letter, at most 63 characters.
CONTENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
CONTENT_TYPE = re.compile(CONTENT_TYPE_PATTERN)

# Free-form tags a caller may attach (X-Task-Id, a message's task_id): bounded, since they travel in
# every cost record and log line.
MAX_TAG_LENGTH = 128

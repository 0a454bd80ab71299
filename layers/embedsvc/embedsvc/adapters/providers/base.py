"""The provider protocol: every provider embeds a list of texts with one model it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class ProviderResult:
    vectors: np.ndarray  # (n, dims) float32, in input order
    prompt_tokens: int | None  # what the provider reports it counted; None if it does not say


class EmbeddingProvider(Protocol):
    key: str

    def embed(
        self,
        texts: list[str],
        model_name: str,
        *,
        dimensions: int | None = None,
        timeout: float | None = None,
    ) -> ProviderResult:
        """Embed `texts` with `model_name` within `timeout` seconds (if given); raise ProviderError subclasses."""
        ...

"""Providers: OpenAI-compatible HTTP endpoints and the in-process local model."""

from __future__ import annotations

from embedsvc.adapters.providers.base import EmbeddingProvider, ProviderResult
from embedsvc.config import Registry


def build_providers(registry: Registry) -> dict[str, EmbeddingProvider]:
    """One provider object per registry entry; nothing connects or loads until first use."""
    from embedsvc.adapters.providers.local_model import LocalModelProvider
    from embedsvc.adapters.providers.openai_http import OpenAIHttpProvider

    built: dict[str, EmbeddingProvider] = {}
    for key, spec in registry.providers.items():
        built[key] = LocalModelProvider(spec) if spec.kind == "local" else OpenAIHttpProvider(spec)
    return built


__all__ = ["EmbeddingProvider", "ProviderResult", "build_providers"]

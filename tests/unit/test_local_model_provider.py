"""The in-process model's failures become provider errors, so the router can try the next endpoint."""

from __future__ import annotations

import pytest

from embedsvc.adapters.providers import local_model
from embedsvc.config import ProviderSpec
from embedsvc.errors import ConfigError, ProviderError

SPEC = ProviderSpec(key="local", kind="local")


def test_a_model_failure_is_a_provider_error(monkeypatch):
    def broken():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(local_model, "load_model", broken)
    with pytest.raises(ProviderError, match="out of memory"):
        local_model.LocalModelProvider(SPEC).embed(["hello"], "all-MiniLM-L6-v2")


def test_a_missing_install_stays_a_configuration_error(monkeypatch):
    def missing():
        raise ConfigError("the local model needs the 'local' extra")

    monkeypatch.setattr(local_model, "load_model", missing)
    with pytest.raises(ConfigError):
        local_model.LocalModelProvider(SPEC).embed(["hello"], "all-MiniLM-L6-v2")


def test_a_model_it_does_not_serve_is_refused():
    with pytest.raises(ProviderError, match="does not serve"):
        local_model.LocalModelProvider(SPEC).embed(["hello"], "text-embedding-3-small")

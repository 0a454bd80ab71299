"""Settings that contradict each other are refused with a message naming both, before any request runs."""

import pytest

from embedsvc.config import Settings
from embedsvc.errors import ConfigError
from embedsvc.services.ratelimit import DEFAULT_BULK_IDLE_CEILING


def test_an_idle_ceiling_below_the_bulk_ceiling_is_a_config_error(monkeypatch):
    monkeypatch.setenv("BULK_CEILING", "0.8")
    monkeypatch.setenv("BULK_IDLE_CEILING", "0.7")
    with pytest.raises(ConfigError, match="BULK_IDLE_CEILING .* must be at least BULK_CEILING"):
        Settings.load()


def test_the_idle_ceiling_defaults_above_the_bulk_ceiling(monkeypatch):
    monkeypatch.delenv("BULK_CEILING", raising=False)
    monkeypatch.delenv("BULK_IDLE_CEILING", raising=False)
    settings = Settings.load()
    assert settings.bulk_ceiling < settings.bulk_idle_ceiling < 1
    assert settings.bulk_idle_ceiling == DEFAULT_BULK_IDLE_CEILING  # the service and the ledger agree

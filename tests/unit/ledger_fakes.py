"""Stand-ins shared by the ledger and budget tests: a clock that moves only when slept, and a metrics recorder."""

from __future__ import annotations


class FakeClock:
    """Time that moves only when someone sleeps."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An OpsMetrics stand-in: every count with its value and dimensions."""

    def __init__(self):
        self.counts: list[tuple[str, float, dict]] = []

    def count(self, name: str, value: float = 1, **dimensions: str) -> None:
        self.counts.append((name, value, dimensions))

    def named(self, name: str) -> list[tuple[float, dict]]:
        return [(value, dims) for n, value, dims in self.counts if n == name]

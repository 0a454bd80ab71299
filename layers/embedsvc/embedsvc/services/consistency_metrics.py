"""EMF for the repair and audit jobs: several metrics, with units, in one record per dimension set.

OpsMetrics.count emits one Count metric per record; the audit emits four gauges per collection (one a
number of seconds), so this writes the same EMF shape through the same sink and namespace instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any, Protocol


class MetricsSink(Protocol):
    """What OpsMetrics offers: where EMF records go, and under which namespace."""

    namespace: str

    def sink(self, blob: dict) -> None: ...


def emit_metrics(
    metrics: MetricsSink | None,
    values: Mapping[str, tuple[float, str]],
    dimensions: Mapping[str, str] | None = None,
) -> None:
    """One EMF record of `values` ({name: (value, unit)}) with exactly `dimensions` (none: a total)."""
    if metrics is None or not values:
        return
    dims = dict(dimensions or {})
    blob: dict[str, Any] = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": metrics.namespace,
                    "Dimensions": [sorted(dims)],
                    "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in values.items()],
                }
            ],
        },
        **{name: value for name, (value, _) in values.items()},
        **dims,
    }
    with contextlib.suppress(Exception):  # a metric must never fail the job it describes
        metrics.sink(blob)

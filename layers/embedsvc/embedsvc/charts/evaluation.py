"""Evaluation runs as a small PNG: grouped bars of their metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from embedsvc.services.evaluation.groundtruth import PathLike
from embedsvc.services.evaluation.metrics import GATE_METRICS
from embedsvc.services.evaluation.runs import Run


def _label(run: Run, runs: Sequence[Run]) -> str:
    same_model = [r for r in runs if r.model_key == run.model_key]
    if len(same_model) == 1:
        return run.model_key
    # Several runs of one model (e.g. weekly): tell them apart by date.
    return f"{run.model_key} {run.created_at:%Y-%m-%d %H:%M}"


def render_chart(
    runs: Sequence[Run],
    path: PathLike,
    *,
    metrics: Sequence[str] = GATE_METRICS,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write grouped bars (one group per metric, one bar per run) to a PNG; returns the path."""
    if not runs:
        raise ValueError("no runs to chart")
    if labels is not None and len(labels) != len(runs):
        raise ValueError("one label per run")
    # matplotlib is an optional dependency (not in the Lambda layer): import it only when drawing.
    # Figure + the Agg canvas directly, so the process-wide backend of a caller is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = len(runs)
    width = 0.8 / n
    for i, run in enumerate(runs):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(metrics))]
        values = [run.aggregate.get(m, 0.0) for m in metrics]
        bars = ax.bar(xs, values, width=width * 0.95, label=labels[i] if labels else _label(run, runs))
        if n <= 4:
            ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m.replace("_at_", "@") for m in metrics], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    gts = sorted({r.ground_truth for r in runs})
    queries = sorted({r.queries for r in runs})
    ax.set_title(
        title or f"{', '.join(gts)} ({'/'.join(str(q) for q in queries)} queries)",
        fontsize=9,
    )
    # Outside the axes: inside, it would cover the bars of metrics near 1.0.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out

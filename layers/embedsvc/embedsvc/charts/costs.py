"""Costs as small PNGs: spend per day by source, and the self-hosting break-even."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedsvc.services.costs import BreakEven


def _figure(width: float, height: float):
    # Figure + the Agg canvas directly, so the process-wide backend of a caller is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path | str) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def render_spend_chart(per_day: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path | str) -> Path:
    """Stacked bars per UTC day and source: dollars on top, tokens below (a free local model spends $0,
    and its tokens are then what shows the work). `per_day` is the report's {day: {source: totals}}."""
    days = sorted(per_day)
    sources = sorted({s for items in per_day.values() for s in items})
    fig = _figure(8.0, 5.0)
    axes = [fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)]
    for ax, field, label in ((axes[0], "usd", "USD"), (axes[1], "tokens", "tokens")):
        bottom = [0.0] * len(days)
        for source in sources:
            values = [float(per_day[d].get(source, {}).get(field, 0) or 0) for d in days]
            ax.bar(range(len(days)), values, bottom=bottom, label=source, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_xticks(range(len(days)))
        ax.set_xticklabels([d[5:] for d in days], fontsize=7, rotation=45 if len(days) > 10 else 0)
        if not any(bottom):
            ax.set_ylim(0, 1)
            note = "$0 (free models only)" if field == "usd" else "no tokens"
            ax.text(0.5, 0.5, f"{note} in this window", transform=ax.transAxes, ha="center", fontsize=8)
    axes[0].set_title(
        f"Spend per day by source ({days[0]} to {days[-1]}, UTC)" if days else "Spend", fontsize=9
    )
    if sources:
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def render_break_even_chart(be: BreakEven, path: Path | str) -> Path:
    """The two monthly cost lines: the managed API (linear) and self-hosting (a step per instance)."""
    from embedsvc.services.costs import volume

    capacity = be.capacity_tokens_per_month
    breakeven = be.break_even_tokens_per_month
    span = max(capacity * 2.2, breakeven * 1.6 if math.isfinite(breakeven) else 0.0)
    unit, unit_name = (1e9, "billions") if span >= 2e9 else (1e6, "millions")
    steps = 400
    xs = [span * i / steps for i in range(steps + 1)]
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([x / unit for x in xs], [be.managed_usd(x) for x in xs], label=f"managed API ({be.model})")
    ax.step(
        [x / unit for x in xs],
        [be.self_hosted_usd(x) for x in xs],
        where="post",
        label=f"self-hosted (${be.instance_usd_per_hour:g}/h per instance, {be.utilization:.0%} busy)",
    )
    top = ax.get_ylim()[1]
    ax.axvline(capacity / unit, color="grey", linestyle=":", linewidth=1)
    ax.text(capacity / unit, top * 0.55, f" one instance: {volume(capacity)}", fontsize=7, color="grey")
    if math.isfinite(breakeven) and breakeven <= span:
        ax.axvline(breakeven / unit, color="red", linestyle="--", linewidth=1)
        ax.text(breakeven / unit, top * 0.45, f" break-even {volume(breakeven)}", fontsize=7, color="red")
    ax.set_xlabel(f"tokens per month ({unit_name})")
    ax.set_ylabel("USD per month")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(
        f"Self-hosting at {be.tokens_per_second:,.0f} tokens/s vs ${be.price_per_million:g} per 1M tokens",
        fontsize=9,
    )
    return _save(fig, path)

"""PNG figures of load-test results (matplotlib, Agg canvas, no display needed).

    plot_latency_cdf({"coe": latency_series(a), "multiplex": latency_series(b)},
                     Path("out/latency_cdf.png"), slo_s=5.0)
    plot_timeline({"coe": samples}, Path("out/timeline.png"))

A timeline sample is `{"t": seconds, "replicas": {deployment: count},
"resident": [expert, ...]}`; `replicas` and `resident` may be missing from a sample
(nothing known then). Figures are built on `matplotlib.figure.Figure` directly, so
pyplot's global state and backend choice are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Latencies spanning more than this ratio are drawn on a log axis.
_LOG_AXIS_SPAN = 50.0


def _save(figure: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(out, dpi=120)
    return out


def plot_latency_cdf(
    series: Mapping[str, Sequence[float]], out: Path, slo_s: float | None = None
) -> Path:
    """One empirical CDF of total latency per system (a system with no successful
    request is named in the legend with no line)."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    everything = [v for values in series.values() for v in values if v > 0]
    for name, values in series.items():
        if not values:
            axes.plot([], [], label=f"{name} (no successful request)")
            continue
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        fraction = np.arange(1, len(ordered) + 1) / len(ordered)
        axes.step(ordered, fraction, where="post", label=f"{name} (n={len(ordered)})")
    if slo_s is not None:
        axes.axvline(slo_s, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo_s:g} s")
    if everything and max(everything) / min(everything) > _LOG_AXIS_SPAN:
        axes.set_xscale("log")
    axes.set_xlabel("total latency (s)")
    axes.set_ylabel("fraction of successful requests")
    axes.set_ylim(0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("Latency CDF")
    return _save(figure, out)


def _plot_system(axes: Axes, name: str, samples: Sequence[Mapping[str, Any]]) -> None:
    times = [float(s["t"]) for s in samples]
    deployments = sorted({d for s in samples for d in s.get("replicas", {})})
    for deployment in deployments:
        counts = [s.get("replicas", {}).get(deployment, np.nan) for s in samples]
        axes.step(times, counts, where="post", label=deployment)
    axes.set_ylabel("replicas")
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(name)
    axes.grid(True, alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    resident = [len(s["resident"]) if "resident" in s else np.nan for s in samples]
    if any(np.isfinite(resident)):
        twin = axes.twinx()
        (line,) = twin.step(
            times, resident, where="post", color="black", linestyle=":", linewidth=1.2
        )
        twin.set_ylabel("resident experts")
        twin.set_ylim(bottom=0, top=max(r for r in resident if np.isfinite(r)) + 1)
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = [*handles, line], [*labels, "resident experts"]
    if handles:
        # Outside the axes, so the legend never hides a line.
        axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize="small")
    if not samples:
        axes.text(0.5, 0.5, "no samples", transform=axes.transAxes, ha="center")


def plot_timeline(timelines: Mapping[str, Sequence[Mapping[str, Any]]], out: Path) -> Path:
    """One subplot per system: replicas per deployment (steps) and resident experts."""
    rows = max(len(timelines), 1)
    figure = Figure(figsize=(10, 2.6 * rows + 0.6), layout="constrained")
    axes_list = figure.subplots(rows, 1, squeeze=False, sharex=True)[:, 0]
    for axes, (name, samples) in zip(axes_list, timelines.items(), strict=False):
        _plot_system(axes, name, samples)
    axes_list[-1].set_xlabel("time since the run started (s)")
    return _save(figure, out)

"""The scale benchmark's ratios, goals, table and figure.

Goals are reported as measured, met or not; a goal whose figures are missing (a system
that did not run) is reported with `met: null`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.harness.stats import ratio

PSS_LIMIT_BYTES = 6e9  # peak PSS outside the object store, at every N
PSS_SPREAD = 0.10  # between the smallest and the largest N of the scaling runs


def ratios(systems: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    coe, multiplex, zero = (systems.get(name, {}) for name in ("coe", "multiplex", "zero"))
    return {
        "coe_switch_overhead_over_multiplex": ratio(
            coe.get("switch_overhead_p50_s"), multiplex.get("switch_overhead_p50_s")
        ),
        "coe_ttft_p99_over_multiplex": ratio(coe.get("ttft_p99_s"), multiplex.get("ttft_p99_s")),
        "coe_goodput_over_multiplex": ratio(coe.get("goodput_rps"), multiplex.get("goodput_rps")),
        "coe_nonresident_ttft_p50_over_zero": ratio(
            _nonresident_ttft(coe), _nonresident_ttft(zero)
        ),
    }


def _nonresident_ttft(system: Mapping[str, Any]) -> float | None:
    value = system.get("nonresident", {}).get("ttft_p50_s")
    return float(value) if value is not None else None


def _goal(name: str, measured: float | None, target: float | None, at_most: bool = True) -> dict:
    met = None
    if measured is not None and target is not None:
        met = measured <= target if at_most else measured >= target
    return {"goal": name, "measured": measured, "target": target, "met": met}


def goals(
    systems: Mapping[str, Mapping[str, Any]],
    ratio_values: Mapping[str, float | None],
    scaling: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    coe = systems.get("coe", {})
    overhead, bound = coe.get("switch_overhead_p50_s"), coe.get("copy_bound_s")
    copy_target = None if bound is None else 1.3 * bound + 0.020
    mismatches = [s.get("mismatches") for s in systems.values() if "mismatches" in s]
    pss = [row["peak_pss_outside_store_bytes"] for row in scaling]
    processes = [row["processes"] for row in scaling]
    spread = (max(pss) - min(pss)) / min(pss) if len(pss) > 1 and min(pss) > 0 else None
    return [
        _goal("coe switch overhead p50 <= 1.3 x copy bound + 20 ms (s)", overhead, copy_target),
        _goal(
            "coe switch overhead <= 0.3 x multiplex's",
            ratio_values["coe_switch_overhead_over_multiplex"],
            0.3,
        ),
        _goal(
            "coe TTFT p99 <= 1.0 x multiplex's", ratio_values["coe_ttft_p99_over_multiplex"], 1.0
        ),
        _goal(
            "coe goodput >= 1.0 x multiplex's",
            ratio_values["coe_goodput_over_multiplex"],
            1.0,
            at_most=False,
        ),
        _goal(
            "coe non-resident TTFT p50 <= 0.02 x zero's",
            ratio_values["coe_nonresident_ttft_p50_over_zero"],
            0.02,
        ),
        _goal(
            "0 mismatches against the fully resident experts",
            float(sum(m for m in mismatches if m is not None)) if mismatches else None,
            0.0,
        ),
        _goal(
            "coe process count independent of N (max - min over N)",
            float(max(processes) - min(processes)) if len(processes) > 1 else None,
            0.0,
        ),
        _goal(
            "coe peak PSS outside the object store <= 6 GB (bytes)",
            max(pss, default=None),
            PSS_LIMIT_BYTES,
        ),
        _goal("coe peak PSS outside the store within 10% across N", spread, PSS_SPREAD),
    ]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: Mapping[str, Any]) -> None:
    print(
        f"{'system':<10} {'ttft p50':>9} {'ttft p99':>9} {'res p50':>8} {'non-res p50':>11} "
        f"{'overhead':>9} {'goodput':>8} {'errors':>6} {'switches':>8} {'procs':>5} {'PSS GB':>7}"
    )
    for name, s in results["systems"].items():
        if "failed" in s:
            print(f"{name:<10} failed: {s['failed']}")
            continue
        pss = s["peak_pss_outside_store_bytes"] / 1e9
        print(
            f"{name:<10} {_fmt(s['ttft_p50_s']):>9} {_fmt(s['ttft_p99_s']):>9} "
            f"{_fmt(s['resident']['ttft_p50_s']):>8} {_fmt(s['nonresident']['ttft_p50_s']):>11} "
            f"{_fmt(s['switch_overhead_p50_s']):>9} {s['goodput_rps']:8.3f} {s['errors']:6d} "
            f"{s['switches']:8d} {s['processes']:5d} {pss:7.2f}"
        )
    for row in results["scaling"]:
        print(
            f"scaling N={row['experts']}: {row['processes']} processes, "
            f"{row['peak_pss_outside_store_bytes'] / 1e9:.2f} GB PSS outside the object store"
        )
    for key, value in results["ratios"].items():
        print(f"{key}: {_fmt(value)}")
    for goal in results["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"goal {goal['goal']}: {_fmt(goal['measured'], '.4g')} ({verdict})")


def _bars(axes: Axes, labels: Sequence[str], groups: Mapping[str, Sequence[float | None]]) -> None:
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(labels))
    for offset, (name, values) in enumerate(groups.items()):
        heights = [np.nan if v is None else v for v in values]
        axes.bar(x + offset * width - 0.4 + width / 2, heights, width, label=name)
    axes.set_xticks(x, labels)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")


def plot_scale(
    results: Mapping[str, Any], latencies: Mapping[str, Sequence[float]], out: Path
) -> Path:
    """TTFT resident vs not, processes and PSS per system, scaling in N, TTFT CDFs."""
    ran = {n: s for n, s in results["systems"].items() if "failed" not in s}
    names = list(ran)
    figure = Figure(figsize=(12, 8), layout="constrained")
    (ttft, memory), (scaling, cdf) = figure.subplots(2, 2)
    _bars(
        ttft,
        names,
        {
            f"{kind} p{q}": [ran[n][kind][f"ttft_p{q}_s"] for n in names]
            for kind in ("resident", "nonresident")
            for q in (50, 99)
        },
    )
    ttft.set_yscale("log")
    ttft.set_ylabel("TTFT (s)")
    ttft.set_title("Time to first token: expert held ready or not")
    _bars(
        memory,
        names,
        {
            "peak PSS outside the store (GB)": [
                ran[n]["peak_pss_outside_store_bytes"] / 1e9 for n in names
            ]
        },
    )
    twin = memory.twinx()
    twin.plot(np.arange(len(names)), [ran[n]["processes"] for n in names], "ko", label="processes")
    twin.set_ylabel("replica processes (dots)")
    twin.set_ylim(bottom=0)
    memory.set_ylabel("GB")
    memory.set_title("Replica processes and their peak memory")
    rows = results["scaling"]
    experts = [row["experts"] for row in rows]
    scaling.plot(
        experts,
        [row["peak_pss_outside_store_bytes"] / 1e9 for row in rows],
        "o-",
        label="PSS outside the store (GB)",
    )
    scaling.plot(experts, [row["processes"] for row in rows], "s--", label="processes")
    scaling.set_xlabel("experts (N)")
    scaling.set_ylabel("GB / processes")
    scaling.set_ylim(bottom=0)
    scaling.grid(True, alpha=0.3)
    scaling.legend(fontsize="small")
    scaling.set_title("coe as the experts grow")
    for name, values in latencies.items():
        if values:
            ordered = np.sort(np.asarray(values))
            cdf.step(
                ordered,
                np.arange(1, len(ordered) + 1) / len(ordered),
                where="post",
                label=f"{name} (n={len(ordered)})",
            )
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (s)")
    cdf.set_ylabel("fraction of successful requests")
    cdf.grid(True, alpha=0.3)
    cdf.legend(fontsize="small")
    cdf.set_title("TTFT CDF")
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(out, dpi=110)
    return out

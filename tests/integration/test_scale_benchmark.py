"""The scale benchmark, small: six experts, a few requests, all three systems.

It runs as the command users run (`python -m benchmarks.scale`), in a process of its
own, since it starts and stops its own Ray instance. Asserts the JSON's shape, that no
request failed and that every sampled answer equals the expert's fully resident one;
the timings it prints are not checked.

Its time is mostly replica processes starting: `coe` twice (N=6 and N=4), `multiplex`
once and, for `zero`, one process per expert its sampled arrivals name. So the arrivals
are few and close together (2/s for 5 s: nine requests, the same ones 1/s for 10 s
would give), and `zero` gets two of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration

SYSTEM_KEYS = {
    "ttft_p50_s",
    "ttft_p99_s",
    "goodput_rps",
    "errors",
    "processes",
    "peak_pss_bytes",
    "peak_pss_outside_store_bytes",
    "switch_overhead_p50_s",
    "mismatches",
}
COE_KEYS = {"copy_bound_s", "spilled_switches"}
# Arrivals `zero` gets: each may start a replica process (seconds each on two cores).
ZERO_REQUESTS = 2
RATIOS = {
    "coe_switch_overhead_over_multiplex",
    "coe_ttft_p99_over_multiplex",
    "coe_goodput_over_multiplex",
    "coe_nonresident_ttft_p50_over_zero",
}


def test_the_small_scale_benchmark_runs_every_system(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        *("--experts", "6", "--real-experts", "0", "--hbm-experts", "2"),
        *("--rate", "2", "--duration", "5", "--timeout", "120"),
        *("--zero-requests", str(ZERO_REQUESTS), "--reference-sample", "4"),
        *("--scaling", "4,6", "--scaling-duration", "2.5"),
        *("--json", str(out)),
    ]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0

    systems = results["systems"]
    assert set(systems) == {"coe", "multiplex", "zero"}
    for name, summary in systems.items():
        assert set(summary) >= SYSTEM_KEYS, (name, summary.get("failed"))
        assert summary["errors"] == 0, (name, summary["errors_by_kind"])
        assert summary["ok"] == summary["requests"] > 0
        assert summary["mismatches"] == 0, summary["reference_checks"]
        assert summary["reference_checks"], name
        assert summary["processes"] >= 2 and summary["peak_pss_outside_store_bytes"] > 0
    assert set(systems["coe"]) >= COE_KEYS
    assert systems["coe"]["copy_bound_s"] is not None and systems["coe"]["switches"] > 0
    assert systems["zero"]["requests"] == ZERO_REQUESTS
    # Every request to `zero` found no replica or one it had started itself.
    assert 1 <= systems["zero"]["switches"] <= ZERO_REQUESTS

    scaling = results["scaling"]
    assert [row["experts"] for row in scaling] == [4, 6]
    assert scaling[0]["processes"] == scaling[1]["processes"] == systems["coe"]["processes"]
    assert set(results["ratios"]) == RATIOS
    assert all(goal["met"] in (True, False, None) for goal in results["goals"])

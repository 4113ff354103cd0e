"""The SN40L paper's switching comparison, checked against the shipped profiles' numbers."""

from __future__ import annotations

import pytest

from benchmarks.tier_sim.paper_comparison import PAPER_SWITCH_SPEEDUP, paper_comparison
from benchmarks.tier_sim.profiles import GB, load_profile


def test_paper_switch_ratios_follow_from_the_profiles() -> None:
    report = paper_comparison(n_requests=400)
    sn40l = load_profile("sn40l")
    assert sn40l.node_host_to_device_gb_per_s is not None
    # Derived here from the profile numbers, not copied from the simulator.
    sn40l_gb_s = min(
        sn40l.expert_shards * sn40l.device.host_link_gb_per_s, sn40l.node_host_to_device_gb_per_s
    )
    expert_bytes = 7e9 * 2
    for name, paper in PAPER_SWITCH_SPEEDUP.items():
        dgx = load_profile(name)
        expected = sn40l_gb_s / (dgx.expert_shards * dgx.device.host_link_gb_per_s)
        ratio = report["ratios"][name]
        assert ratio["per_switch"] == pytest.approx(expected)
        # The paper states "> 1 TB/s" and whole-number speedups, i.e. the ratio rounded
        # down: ours must lie in [paper, paper + 1).
        assert paper <= ratio["per_switch"] < paper + 1
        assert report["profiles"][name]["per_switch_s"] == pytest.approx(
            expert_bytes / (dgx.device.host_link_gb_per_s * GB)
        )
        # Trace ratio = per-switch ratio x switch-count ratio (capacities differ).
        runs = report["profiles"]
        counts = runs[name]["switches"] / runs["sn40l"]["switches"]
        assert ratio["trace_switch_seconds"] == pytest.approx(ratio["per_switch"] * counts)
        # Spreading each expert over all 8 GPUs would use 8 links at once.
        assert ratio["all_links"]["per_switch"] == pytest.approx(expected / dgx.devices)


def test_paper_capacities_and_spill() -> None:
    report = paper_comparison(n_requests=200)
    profiles = report["profiles"]
    # SN40L: one group of 8 sockets x 64 GB = 512 GB -> 36 experts of 14 GB;
    # DGX: 8 GPUs x floor(80 / 14) = 40 experts.
    sn40l, h100 = load_profile("sn40l"), load_profile("dgx-h100")
    assert profiles["sn40l"]["hbm_capacity_experts"] == int(
        sn40l.devices * sn40l.device.hbm_gb // 14
    )
    assert profiles["dgx-h100"]["hbm_capacity_experts"] == h100.devices * int(
        h100.device.hbm_gb // 14
    )
    # 150 x 14 GB = 2.1 TB fits the SN40L's 12 TB of DDR but not a DGX's 2 TB of host DRAM.
    assert profiles["sn40l"]["fits_in_host_memory"]
    for name in ("dgx-h100", "dgx-a100"):
        assert not profiles[name]["fits_in_host_memory"]
        assert any("host memory" in warning for warning in profiles[name]["warnings"])

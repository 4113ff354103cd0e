"""A small valid hardware profile for the tier simulator's tests, and overrides of it."""

from __future__ import annotations

from typing import Any

from benchmarks.tier_sim.profiles import GB, HardwareProfile, parse_profile

UNIT = int(GB)  # every hand-worked expert is 1 GB


def profile_data(**overrides: Any) -> dict[str, Any]:
    """A small valid profile: 1 device, 3 GB HBM, 1000 GB/s link (1 ms per 1 GB switch)."""
    data: dict[str, Any] = {
        "name": "toy",
        "devices": 1,
        "device": {"kind": "toy", "hbm_gb": 3, "hbm_gb_per_s": 100, "host_link_gb_per_s": 1000},
        "host_memory_gb": 100,
        "expert_shards": 1,
        "sources": {
            key: "test"
            for key in (
                "devices",
                "device.hbm_gb",
                "device.hbm_gb_per_s",
                "device.host_link_gb_per_s",
                "host_memory_gb",
                "expert_shards",
            )
        },
    }
    for key, value in overrides.items():
        if key.startswith("device."):
            data["device"] = {**data["device"], key.split(".", 1)[1]: value}
        else:
            data[key] = value
    return data


def toy(**overrides: Any) -> HardwareProfile:
    return parse_profile(profile_data(**overrides))

"""Hardware profiles: the shipped ones, validation, files, and measuring this host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.tier_sim.profiles import (
    ProfileError,
    available_profiles,
    load_profile,
    measure_this_machine,
    parse_profile,
    write_profile,
)
from tests.unit.benchmarks.tier_sim.toy_profile import profile_data, toy


def test_shipped_profiles_load_and_cite_every_number() -> None:
    names = available_profiles()
    assert {"sn40l", "dgx-h100", "dgx-a100", "this-machine"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert set(profile.numbers_needing_sources()) <= set(profile.sources)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"expert_shards": 3, "devices": 8}, "expert_shards (3) must divide devices (8)"),
        ({"device.hbm_gb": -1}, "device.hbm_gb"),
        ({"device.host_link_gb_per_s": 0}, "(got 0)"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"name": "Bad Name"}, "'Bad Name'"),
        ({"sources": {}}, "sources has no citation for"),
        ({"hbm_reserved_gb": 3}, "hbm_reserved_gb (3.0) leaves no room"),
    ],
)
def test_profile_validation_names_the_bad_value(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProfileError) as error:
        parse_profile(profile_data(**overrides), "toy.yaml")
    assert fragment in str(error.value)
    assert "toy.yaml" in str(error.value)


def test_profile_is_frozen() -> None:
    with pytest.raises(ValueError):
        toy().devices = 2  # type: ignore[misc]


def test_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="must be a mapping, got list"):
        load_profile(listed)


def test_measured_profile_round_trips(tmp_path: Path) -> None:
    measured = measure_this_machine(size_mib=4, repeats=1)
    assert measured.device.host_link_gb_per_s > 0
    assert measured.host_memory_gb > measured.device.hbm_gb
    path = write_profile(measured, tmp_path / "m.yaml", header="measured\nin a test")
    assert path.read_text(encoding="utf-8").startswith("# measured\n# in a test\n")
    assert load_profile(path) == measured

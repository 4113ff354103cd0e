from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.cli.main import main
from cluster.cli.tier_commands import format_status
from memory_tiers.ddr import CallableSource, InProcessObjectStore
from memory_tiers.packing import TensorEntry, TensorIndex
from memory_tiers.placement import DeviceSpec, PlacementService


def packed(nbytes: int) -> tuple[np.ndarray, TensorIndex]:
    index = TensorIndex((TensorEntry("w", "uint8", (nbytes,), 0, nbytes),), nbytes)
    return np.arange(nbytes, dtype=np.uint8), index


def test_status_lists_residents_and_counters_from_the_wire_format() -> None:
    service = PlacementService([DeviceSpec("host0", 4096)], InProcessObjectStore(), "lru")
    for name in ("alpha", "beta", "gamma"):
        service.register(name, CallableSource(lambda: packed(1536), name))
    service.pin("alpha", "host0")
    for name in ("beta", "gamma", "beta"):
        service.release(service.acquire(name, "host0"))
    # What the placement deployment returns travels as JSON; format what arrives.
    residency = json.loads(json.dumps(service.residency_json()))
    metrics = json.loads(json.dumps(service.metrics()))
    text = format_status(residency, metrics)
    table, counters = text.split("\nhost0: hits")
    # Room for two: alpha is pinned, gamma evicted beta, then beta came back over gamma.
    assert "policy lru, 2 resident" in table
    assert "alpha" in table and "pinned" in table
    assert "beta" in table and "gamma" not in table
    assert "evictions 2" in counters


def test_simulate_forwards_to_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiers", "simulate", "--", "paper", "--requests", "200"]) == 0
    assert "per-switch ratio" in capsys.readouterr().out


def test_budget_smaller_than_an_expert_fails_at_load(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from cluster.config import ConfigError, parse_config
    from cluster.setup_steps import check_tier_budget
    from memory_tiers.packing import checkpoint_nbytes
    from tests.unit.cluster.test_config import demo_data

    for name, elements in (("small", 100), ("large", 1000)):
        (tmp_path / name).mkdir()
        save_file(
            {"w": np.zeros(elements, dtype=np.float32)}, str(tmp_path / name / "m.safetensors")
        )
    assert checkpoint_nbytes(tmp_path / "large", "float32") == 4000
    assert checkpoint_nbytes(tmp_path / "large", "bfloat16") == 2000
    data = demo_data()
    data["tiers"] = {"enabled": True, "hbm_budget_bytes": 3000}
    config = parse_config(data)
    checkpoints = {e.name: tmp_path / "small" for e in config.experts}
    check_tier_budget(config, checkpoints)  # every expert fits: no error
    checkpoints["storyteller"] = tmp_path / "large"
    with pytest.raises(ConfigError, match=r"hbm_budget_bytes \(3000\).*'storyteller' \(4000"):
        check_tier_budget(config, checkpoints)
    data["tiers"]["pinned"] = ["generalist", "math-tutor", "code-assistant", "science-explainer"]
    data["tiers"]["hbm_budget_bytes"] = 5000
    with pytest.raises(ConfigError, match="pinned"):
        check_tier_budget(
            parse_config(data),
            {e.name: tmp_path / "small" for e in config.experts}
            | {"generalist": tmp_path / "large", "math-tutor": tmp_path / "large"},
        )

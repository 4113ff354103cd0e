"""A config of 150 experts on the executor pool: it validates, binds a graph whose size
does not grow with the experts, and packs each expert once (an added one alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cluster.config import CoEConfig, ConfigError, parse_config
from cluster.serve.app import EXECUTOR_NAME, build_app
from cluster.serve.placement_replica import PlacementReplica
from cluster.serve.ray_internals import bound_deployment, deployment_config
from cluster.setup_steps import check_architectures
from memory_tiers.ddr import CheckpointSource, InProcessObjectStore
from memory_tiers.packing import checkpoint_nbytes

TINY = LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(TINY).save_pretrained(str(directory))
    return directory


def _data(count: int, checkpoint: Path, arena_dir: Path, **executors: Any) -> dict[str, Any]:
    nbytes = checkpoint_nbytes(checkpoint, "float32")
    return {
        "experts": [
            {"name": f"e{i:03d}", "checkpoint": str(checkpoint), "params_b": 0.001}
            for i in range(count)
        ],
        "categories": [{"name": "general", "examples": ["Hello"]}],
        "category_map": {"general": "e000"},
        "generalist": "e000",
        "tiers": {"enabled": True, "hbm_budget_bytes": 4 * nbytes, "arena_dir": str(arena_dir)},
        "executors": {"enabled": True, **executors},
        "serve": {"app_name": "many"},
    }


def _graph(config: CoEConfig, checkpoint: Path) -> dict[str, Any]:
    """Every deployment the application binds, by name."""
    ingress = bound_deployment(build_app(config, {e.name: checkpoint for e in config.experts}))
    _config, router, experts, placement, _key, executors, pooled = ingress.init_args
    found = {"ingress": ingress, "router": bound_deployment(router)}
    found["placement"] = bound_deployment(placement)
    if executors is not None:
        found[EXECUTOR_NAME] = bound_deployment(executors)
    for application in experts.values():
        deployment = bound_deployment(application)
        found[deployment.name] = deployment
    found["pooled"] = pooled
    return found


def test_the_graph_does_not_grow_with_the_experts(tiny_dir: Path, tmp_path: Path) -> None:
    small = _graph(parse_config(_data(20, tiny_dir, tmp_path)), tiny_dir)
    large = _graph(parse_config(_data(150, tiny_dir, tmp_path)), tiny_dir)
    assert (
        sorted(small) == sorted(large) == ["executors", "ingress", "placement", "pooled", "router"]
    )
    assert len(large["pooled"]) == 150
    _placement, k, preload = large[EXECUTOR_NAME].init_args
    assert preload is True
    pooled = deployment_config(large[EXECUTOR_NAME]).user_config
    experts, checkpoints = pooled["experts"], pooled["checkpoints"]
    assert [e["name"] for e in experts] == large["pooled"]
    assert set(checkpoints) == set(large["pooled"])
    assert k == 32


def test_dedicated_experts_keep_their_own_deployment(tiny_dir: Path, tmp_path: Path) -> None:
    data = _data(5, tiny_dir, tmp_path)
    data["experts"][2]["dedicated"] = True
    data["experts"][2]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    graph = _graph(parse_config(data), tiny_dir)
    assert "expert-e002" in graph
    assert "e002" not in graph["pooled"] and len(graph["pooled"]) == 4
    autoscaling = deployment_config(graph["expert-e002"]).autoscaling_config
    assert autoscaling.max_replicas == 3


def test_the_pool_is_fixed_or_autoscaled_as_configured(tiny_dir: Path, tmp_path: Path) -> None:
    fixed = _graph(parse_config(_data(3, tiny_dir, tmp_path, replicas=3)), tiny_dir)
    assert deployment_config(fixed[EXECUTOR_NAME]).num_replicas == 3
    assert deployment_config(fixed[EXECUTOR_NAME]).autoscaling_config is None
    data = _data(3, tiny_dir, tmp_path, replicas=1, max_replicas=4, max_ongoing_requests=9)
    scaled = _graph(parse_config(data), tiny_dir)[EXECUTOR_NAME]
    autoscaling = deployment_config(scaled).autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert scaled.max_ongoing_requests == 9


def test_executors_need_the_tiers(tiny_dir: Path, tmp_path: Path) -> None:
    data = _data(3, tiny_dir, tmp_path)
    data["tiers"] = {"enabled": False}
    with pytest.raises(ConfigError, match=r"executors\.enabled needs tiers\.enabled"):
        parse_config(data)
    data = _data(3, tiny_dir, tmp_path, replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="max_replicas"):
        parse_config(data)


def test_an_architecture_no_executor_can_build_fails_naming_the_expert(
    tiny_dir: Path, tmp_path: Path
) -> None:
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "vit"}')
    data = _data(3, tiny_dir, tmp_path)
    data["experts"][1]["checkpoint"] = str(odd)
    config = parse_config(data)
    checkpoints = {e.name: Path(e.checkpoint or "") for e in config.experts}
    with pytest.raises(ConfigError, match=r"expert 'e001'.*'vit'"):
        check_architectures(config, checkpoints)


class CountingStore(InProcessObjectStore):
    """The object store, counting the buffers put into it (one per packed expert)."""

    puts = 0

    def put(self, array: np.ndarray) -> Any:
        CountingStore.puts += 1
        return super().put(array)


def test_each_expert_is_packed_once_and_an_added_one_alone(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 experts on one checkpoint: it is read once, and each expert gets its own
    object in the store; an expert added later is the only one packed then."""
    builds: list[Path] = []
    build = CheckpointSource.build

    def counted(self: CheckpointSource) -> Any:
        builds.append(self.directory)
        return build(self)

    monkeypatch.setattr(CheckpointSource, "build", counted)
    CountingStore.puts = 0
    data = _data(150, tiny_dir, tmp_path)
    config = parse_config(data)
    replica = PlacementReplica()
    replica.new_store = CountingStore
    replica.arena_id = lambda: "0123456789ab"
    checkpoints = {e.name: str(tiny_dir) for e in config.experts}
    try:
        replica.reconfigure({"config": data, "checkpoints": checkpoints})
        assert CountingStore.puts == 150
        assert builds == [tiny_dir]
        data["experts"].append({"name": "e150", "checkpoint": str(tiny_dir), "params_b": 0.001})
        checkpoints["e150"] = str(tiny_dir)
        replica.reconfigure({"config": data, "checkpoints": checkpoints})
        assert CountingStore.puts == 151
        assert builds == [tiny_dir, tiny_dir]
        assert replica._require().has_expert("e150")
    finally:
        replica.__del__()


def test_a_pooled_expert_may_not_set_what_only_its_own_deployment_has(
    tiny_dir: Path, tmp_path: Path
) -> None:
    data = _data(3, tiny_dir, tmp_path)
    data["experts"][1]["max_ongoing_requests"] = 9
    with pytest.raises(ConfigError, match=r"expert 'e001' runs on the executor pool.*ongoing"):
        parse_config(data)
    data["experts"][1]["dedicated"] = True
    config = parse_config(data)
    # What every replica receives (a full dump) validates again.
    assert parse_config(config.model_dump(mode="json")) == config

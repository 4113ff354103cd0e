from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import ConfigError, load_config, parse_config
from tests.conftest import DEMO_CONFIG


def demo_data() -> dict[str, Any]:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def test_demo_config_is_valid() -> None:
    config = load_config(DEMO_CONFIG)
    assert len(config.experts) >= 4
    assert config.serve.host == "127.0.0.1"
    assert {e.engine for e in config.experts} == {"transformers", "deepspeed"}
    assert set(config.category_map) == {c.name for c in config.categories}


def test_config_is_frozen() -> None:
    config = load_config(DEMO_CONFIG)
    with pytest.raises(ValidationError):
        config.serve.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["experts"][0].update(dtype="float64"), ["experts.0.dtype", "'float64'"]),
        (lambda d: d["experts"][1].update(engine="vllm"), ["experts.1.engine", "'vllm'"]),
        (lambda d: d["experts"][0].update(colour="red"), ["experts.0.colour", "'red'"]),
        (lambda d: d["serve"].update(port=70000), ["serve.port", "70000"]),
        (lambda d: d["router"].update(confidence_threshold=1.5), ["confidence_threshold", "1.5"]),
        (lambda d: d.update(generalist="nobody"), ["'nobody'"]),
        (lambda d: d["category_map"].update(math="ghost"), ["'ghost'"]),
        (lambda d: d["category_map"].pop("math"), ["['math']"]),
        (
            lambda d: d["experts"][0]["autoscaling"].update(min_replicas=3, max_replicas=2),
            ["experts.0.autoscaling", "min_replicas (3) exceeds max_replicas (2)"],
        ),
        (lambda d: d["experts"][0].update(checkpoint="/x"), ["exactly one of checkpoint"]),
        (lambda d: d["experts"][0].update(name="Bad Name"), ["'Bad Name'"]),
        (lambda d: d["router"].update(classifier="trained"), ["artifact must be set"]),
        (lambda d: d["router"].update(artifact="/a"), ["artifact must be set"]),
        (lambda d: d["router"].update(routing="soft"), ["soft routing needs expert_scores"]),
        (lambda d: d["router"].update(cost_weight=-1), ["router.cost_weight", "-1"]),
        (lambda d: d["router"].update(embedder="word2vec"), ["unknown embedder 'word2vec'"]),
        (lambda d: d["categories"][0].update(examples=[]), ["need classifier 'trained'"]),
        (lambda d: d.update(expert_scores={"ghost": {}}), ["unknown category 'ghost'"]),
        (lambda d: d.update(expert_scores={"math": {"nobody": 1.0}}), ["['nobody']"]),
        (lambda d: d.update(tiers={"enabled": True}), ["needs hbm_budget_bytes"]),
        (lambda d: d.update(tiers={"hbm_budget_bytes": 0}), ["tiers.hbm_budget_bytes", "0"]),
        (lambda d: d.update(tiers={"eviction": "fifo"}), ["tiers.eviction", "'fifo'"]),
        (lambda d: d.update(tiers={"active_slots": 0}), ["tiers.active_slots", "0"]),
        (lambda d: d["experts"][0].update(name="coe"), ["reserved"]),
        (lambda d: d["experts"].append(dict(d["experts"][0])), ["duplicate expert names"]),
        (lambda d: d["tiers"].update(pinned=["ghost"]), ["tiers.pinned", "'ghost'"]),
        (lambda d: d["serve"].update(default_max_tokens=9999), ["default_max_tokens (9999)"]),
        (lambda d: d["serve"].update(request_timeout_s=0), ["serve.request_timeout_s", "0"]),
        (lambda d: d["serve"].update(grpc_port=0), ["serve.grpc_port", "0"]),
        (lambda d: d["serve"].update(retry_after_s=0), ["serve.retry_after_s", "0"]),
        (lambda d: d["experts"][0].update(max_queued_requests=0), ["max_queued_requests", "0"]),
        (lambda d: d["experts"][0].update(start_attempts=0), ["experts.0.start_attempts", "0"]),
    ],
)
def test_bad_config_names_field_and_value(mutate: Any, expected: list[str]) -> None:
    data = demo_data()
    mutate(data)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "demo.yaml")
    for fragment in expected:
        assert fragment in str(caught.value)


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["a"], "x.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experts: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_relative_path_falls_back_to_project_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo.yaml").generalist == "generalist"


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "env"))
    assert load_config(DEMO_CONFIG).resolved_cache_dir() == tmp_path / "env"
    data = demo_data()
    data["cache_dir"] = str(tmp_path / "cfg")
    assert parse_config(data).resolved_cache_dir() == tmp_path / "cfg"


def test_every_field_is_described() -> None:
    from cluster import config as module

    for model in (
        module.CoEConfig,
        module.ExpertSettings,
        module.CategorySettings,
        module.RouterSettings,
        module.TierSettings,
        module.ServeSettings,
        module.AutoscalingSettings,
        module.ActorOptions,
    ):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize(
    ("autoscaling", "expected"),
    [
        ({"policy": "coe", "idle": "zero", "min_replicas": 1}, "needs min_replicas 0"),
        ({"policy": "coe", "idle": "park", "min_replicas": 0}, "needs min_replicas >= 1"),
        ({"policy": "fastest"}, "'fastest'"),
        ({"policy": "coe", "idle": "sleep"}, "'sleep'"),
    ],
)
def test_bad_autoscaling_policy_is_named(autoscaling: dict[str, Any], expected: str) -> None:
    data = demo_data()
    data["experts"][0]["autoscaling"] = autoscaling
    with pytest.raises(ConfigError, match=expected):
        parse_config(data, "demo")


def test_a_bad_api_key_is_never_echoed() -> None:
    data = demo_data()
    data["serve"]["api_key"] = 123456789
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert "serve.api_key" in str(caught.value)
    assert "123456789" not in str(caught.value)


def test_api_key_comes_from_the_config_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COE_API_KEY", "env-key")
    assert parse_config(demo_data()).serve.resolved_api_key() == "env-key"
    data = demo_data()
    data["serve"]["api_key"] = "file-key"
    config = parse_config(data)
    assert config.serve.resolved_api_key() == "file-key"
    assert "file-key" not in repr(config) and "file-key" not in str(config.model_dump())
    data["serve"] = {**demo_data()["serve"], "api_key_env": None}
    assert parse_config(data).serve.resolved_api_key() is None
    monkeypatch.delenv("COE_API_KEY")
    assert parse_config(demo_data()).serve.resolved_api_key() is None

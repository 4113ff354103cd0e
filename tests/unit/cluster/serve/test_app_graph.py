"""The Serve graph built from a config (bound, never run: no Ray is started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster.config import ConfigError, load_config, parse_config
from cluster.serve.app import (
    app_builder,
    autoscaling_config,
    build_app,
    expert_deployment_name,
)
from cluster.serve.ray_internals import bound_deployment, deployment_config
from tests.conftest import DEMO_CONFIG
from tests.unit.cluster.test_config import demo_data


def bound(application: Any) -> Any:
    return bound_deployment(application)


def test_one_deployment_per_expert_with_its_yaml_settings(tmp_path: Path) -> None:
    data = demo_data()
    data["executors"] = {"enabled": False}  # every expert dedicated
    data["experts"][1]["autoscaling"] = {"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 1}
    data["experts"][1]["ray_actor_options"] = {"num_cpus": 0.5, "memory": 1_000_000}
    data["experts"][1]["max_ongoing_requests"] = 7
    data["experts"][1]["start_attempts"] = 1
    config = parse_config(data)
    ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
    assert ingress.name == "ingress"
    # Requests waiting on a slow expert must not stall the ingress for everyone else.
    assert ingress.max_ongoing_requests >= 1000
    _config, router, experts, placement, _key, _executors, _pooled = ingress.init_args
    assert bound(placement).name == "placement"  # the demo serves through the tiers
    assert bound(router).name == "router"
    assert sorted(experts) == sorted(e.name for e in config.experts)
    math = bound(experts[config.experts[1].name])
    assert math.name == expert_deployment_name(config.experts[1].name)
    autoscaling = deployment_config(math).autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (0, 3)
    assert autoscaling.upscale_delay_s == 1
    assert math.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0, "memory": 1_000_000}
    assert math.max_ongoing_requests == 7
    assert math.max_queued_requests == 32
    assert deployment_config(math).max_constructor_retry_count == 1
    assert math.init_args[1] == str(tmp_path)
    # Unset, the retry bound stays Serve's own default.
    default = deployment_config(bound(experts[config.experts[0].name]))
    assert default.max_constructor_retry_count == type(default)().max_constructor_retry_count


def test_tiers_add_one_placement_service_shared_by_experts(tmp_path: Path) -> None:
    data = demo_data()
    data["tiers"] = {"enabled": True, "hbm_budget_bytes": 2_000_000_000, "eviction": "lfu"}
    config = parse_config(data)
    ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
    _config, _router, experts, placement, _key, _executors, _pooled = ingress.init_args
    assert bound(placement).name == "placement"
    assert bound(placement).max_ongoing_requests >= 1000
    for expert in experts.values():
        assert bound(expert).init_args[2] is placement


def test_tiers_off_means_no_placement_service(tmp_path: Path) -> None:
    data = demo_data()
    data["tiers"] = {"enabled": False}
    data["executors"] = {"enabled": False}
    config = parse_config(data)
    ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
    assert ingress.init_args[3] is None
    for expert in ingress.init_args[2].values():
        assert bound(expert).init_args[2] is None


def test_the_api_key_reaches_only_the_ingress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COE_API_KEY", raising=False)
    data = demo_data()
    data["serve"] = {**data.get("serve", {}), "api_key": "s3cret-key"}
    config = parse_config(data)
    ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
    as_dict, router, _experts, placement, key, _executors, _pooled = ingress.init_args
    assert key == "s3cret-key"
    # Neither the ingress's config nor the router's or placement's user_config holds it.
    assert "api_key" not in as_dict["serve"]
    for deployment in (bound(router), bound(placement)):
        assert "s3cret-key" not in repr(deployment.user_config)
    assert "s3cret-key" not in repr(config)


def test_the_api_key_may_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COE_API_KEY", "from-env")
    config = parse_config(demo_data())
    ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
    assert ingress.init_args[4] == "from-env"
    monkeypatch.setenv("COE_API_KEY", "")
    ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
    assert ingress.init_args[4] is None


def test_app_builder_rejects_unknown_args() -> None:
    with pytest.raises(ConfigError, match="bad application args"):
        app_builder({"config": str(DEMO_CONFIG), "colour": "red"})


def test_app_builder_reports_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_CONFIG.read_text().replace("port: 8000", "port: -1"))
    with pytest.raises(ConfigError, match=r"serve\.port"):
        app_builder({"config": str(bad)})


def test_demo_config_loads_for_the_graph() -> None:
    assert load_config(DEMO_CONFIG).serve.app_name == "coe"


def test_versions_change_only_where_the_config_changed(tmp_path: Path) -> None:
    def versions(data: dict[str, Any]) -> dict[str, str]:
        config = parse_config(data)
        ingress = bound(build_app(config, {e.name: tmp_path for e in config.experts}))
        _config, router, experts, placement, _key, executors, _pooled = ingress.init_args
        found = {name: bound(expert).version for name, expert in experts.items()}
        found["router"] = bound(router).version
        found["placement"] = bound(placement).version
        found["executors"] = bound(executors).version
        return found

    before = versions(demo_data())
    assert versions(demo_data()) == before  # rebuilding the same config changes nothing
    changed = demo_data()
    changed["experts"].append({**changed["experts"][0], "name": "newcomer"})
    changed["categories"].append({"name": "poetry", "examples": ["a poem"]})
    changed["category_map"]["poetry"] = "newcomer"
    changed["experts"][2]["system_prompt"] = "Answer in code only."  # a pooled expert
    changed["experts"][0]["system_prompt"] = "Answer briefly."  # the dedicated generalist
    after = versions(changed)
    assert after.pop("newcomer")
    differs = {name for name in before if after[name] != before[name]}
    # The router, placement and the executor pool take the new config through
    # reconfigure (user_config); only the changed dedicated expert restarts.
    assert differs == {changed["experts"][0]["name"]}


def test_default_autoscaling_policy_passes_serve_fields_only() -> None:
    data = demo_data()
    config = parse_config(data, "demo")
    emitted = autoscaling_config(config.experts[0].autoscaling)
    assert "policy" not in emitted and "idle" not in emitted and "idle_s" not in emitted
    assert emitted["max_replicas"] == data["experts"][0]["autoscaling"]["max_replicas"]


def test_coe_autoscaling_policy_emits_the_expert_policy() -> None:
    data = demo_data()
    data["experts"][0]["autoscaling"] = {
        "policy": "coe",
        "idle": "zero",
        "idle_s": 42,
        "min_replicas": 0,
        "max_replicas": 3,
    }
    emitted = autoscaling_config(parse_config(data, "demo").experts[0].autoscaling)
    policy_function = emitted["policy"]["policy_function"]
    assert policy_function == "cluster.serve.autoscaling:ExpertAutoscalingPolicy"
    assert emitted["policy"]["policy_kwargs"]["idle_mode"] == "zero"
    assert emitted["policy"]["policy_kwargs"]["idle_s"] == 42
    # The policy keeps its own clocks; Serve's must not add to them.
    assert emitted["upscale_delay_s"] == emitted["downscale_delay_s"] == 0.0
    assert (emitted["min_replicas"], emitted["max_replicas"]) == (0, 3)


def test_the_ingress_version_is_stable_and_follows_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-applying the same config keeps the ingress (and its streams); a new key or a
    config change restarts it. The version carries the key only as its fingerprint."""

    def ingress_version(key: str | None, data: dict[str, Any] | None = None) -> str:
        if key is None:
            monkeypatch.delenv("COE_API_KEY", raising=False)
        else:
            monkeypatch.setenv("COE_API_KEY", key)
        config = parse_config(data or demo_data())
        version = bound(build_app(config, {e.name: tmp_path for e in config.experts})).version
        assert isinstance(version, str) and "k-one" not in version
        return version

    keyed = ingress_version("k-one")
    assert ingress_version("k-one") == keyed
    assert ingress_version("k-two") != keyed
    assert ingress_version(None) not in {keyed, ingress_version("k-two")}
    changed = demo_data()
    changed["serve"] = {**changed.get("serve", {}), "max_tokens_limit": 777}
    assert ingress_version("k-one", changed) != keyed

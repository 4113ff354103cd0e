"""`serve.object_store_bytes`: checked against Ray's minimum, and given to `ray.init` by
`coe serve` and `local_serve` (no Ray started here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from cluster.cli import serve_command
from cluster.config import OBJECT_STORE_MINIMUM_BYTES, CoEConfig, ConfigError, parse_config
from cluster.serve import lifecycle
from tests.conftest import free_port

STORE = 100_000_000


def config_with(serve_settings: dict[str, Any]) -> CoEConfig:
    return parse_config(
        {
            "experts": [{"name": "solo", "checkpoint": "/nowhere", "params_b": 0.1}],
            "categories": [{"name": "general", "examples": ["Hello"]}],
            "category_map": {"general": "solo"},
            "generalist": "solo",
            "serve": serve_settings,
        },
        "object-store-test",
    )


def test_the_object_store_size_is_left_to_ray_unless_set() -> None:
    assert config_with({}).serve.object_store_bytes is None
    assert config_with({"object_store_bytes": STORE}).serve.object_store_bytes == STORE


def test_an_object_store_below_rays_minimum_is_refused() -> None:
    from ray._private.ray_constants import OBJECT_STORE_MINIMUM_MEMORY_BYTES

    assert OBJECT_STORE_MINIMUM_BYTES == OBJECT_STORE_MINIMUM_MEMORY_BYTES
    config_with({"object_store_bytes": OBJECT_STORE_MINIMUM_BYTES})
    with pytest.raises(ConfigError, match=r"serve\.object_store_bytes"):
        config_with({"object_store_bytes": OBJECT_STORE_MINIMUM_BYTES - 1})


def test_local_serve_sizes_the_object_store(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "init", lambda **options: made.append(options))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **options: None)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    settings = config_with({"port": 8123, "object_store_bytes": STORE}).serve
    with lifecycle.local_serve(settings):
        pass
    with lifecycle.local_serve(settings.model_copy(update={"object_store_bytes": None})):
        pass
    assert made[0]["object_store_memory"] == STORE
    assert "object_store_memory" not in made[1]


class _Stop(Exception):
    """Ends `serve_foreground` at Ray's start, once the options are recorded."""


def test_coe_serve_starts_ray_with_the_configured_object_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[dict[str, Any]] = []

    def start_local_ray(**options: Any) -> None:
        started.append(options)
        raise _Stop

    monkeypatch.setattr("cluster.setup_steps.prepare_checkpoints", lambda config, progress: {})
    monkeypatch.setattr(lifecycle, "start_local_ray", start_local_ray)
    said: list[str] = []
    config = config_with({"port": free_port(), "object_store_bytes": STORE})
    with pytest.raises(_Stop):
        serve_command.serve_foreground(config, said.append)
    assert started == [{"object_store_memory": STORE}]
    assert "starting Ray (local, dashboard off, object store 100 MB)" in said

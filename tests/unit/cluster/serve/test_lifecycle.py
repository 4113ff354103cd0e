"""Starting, joining and stopping Ray + Serve, with Ray's own calls replaced by recorders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.exceptions import AuthenticationError

from cluster.config import CoEConfig, ServeSettings, parse_config
from cluster.serve import lifecycle
from cluster.serve.grpc_proxy import SERVICER_FUNCTIONS
from cluster.serve.placement_replica import arena_path
from memory_tiers.arena import DeviceArena
from tests.unit.cluster.test_config import demo_data

ARENA_ID = "0123456789ab"


class Unavailable(Exception):
    pass


def config_with_tiers(arena_dir: Path, enabled: bool = True) -> CoEConfig:
    data = demo_data()
    data["tiers"] = {**data.get("tiers", {}), "enabled": enabled, "arena_dir": str(arena_dir)}
    data["executors"] = {**data.get("executors", {}), "enabled": enabled}  # they need the tiers
    return parse_config(data)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every Ray and Serve call lifecycle makes, in order, instead of making it."""
    made: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            made.append((name, kwargs))

        return record

    monkeypatch.setattr(ray, "init", recorder("ray.init"))
    monkeypatch.setattr(ray, "shutdown", recorder("ray.shutdown"))
    for name in ("start", "run", "delete", "shutdown"):
        monkeypatch.setattr(serve, name, recorder(f"serve.{name}"))
    serve_logger = logging.getLogger(lifecycle.SERVE_LOGGER)
    level = serve_logger.level
    yield made
    serve_logger.setLevel(level)


def names(made: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in made]


def test_local_options_turn_the_dashboard_off_and_leave_unset_options_to_ray() -> None:
    assert lifecycle.local_ray_options() == {
        "address": "local",
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }
    assert lifecycle.local_ray_options(
        logging_level=None, log_to_driver=False, object_store_memory=1 << 30
    ) == {
        "address": "local",
        "include_dashboard": False,
        "log_to_driver": False,
        "object_store_memory": 1 << 30,
    }


def test_serve_options_listen_where_the_settings_say() -> None:
    http_only = lifecycle.serve_options(ServeSettings(host="127.0.0.1", port=8123))
    assert http_only == {"http_options": {"host": "127.0.0.1", "port": 8123}}
    with_grpc = lifecycle.serve_options(ServeSettings(port=8123, grpc_port=9123))
    assert with_grpc["grpc_options"]["port"] == 9123
    assert with_grpc["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    assert "controller_options" in with_grpc  # the gRPC proxy binds to the host, not [::]


def test_base_url_brackets_an_ipv6_host() -> None:
    assert lifecycle.base_url(ServeSettings(port=8123)) == "http://127.0.0.1:8123"
    assert lifecycle.base_url(ServeSettings(host="::1", port=8123)) == "http://[::1]:8123"


def test_remove_arena_only_touches_a_tiered_config(tmp_path: Path) -> None:
    tiered = config_with_tiers(tmp_path)
    arena_path(tiered, ARENA_ID).write_bytes(b"arena")
    lifecycle.remove_arena(tiered)
    assert not arena_path(tiered, ARENA_ID).exists()
    lifecycle.remove_arena(tiered)  # already gone: nothing to do
    untiered = config_with_tiers(tmp_path, enabled=False)
    arena_path(untiered, ARENA_ID).write_bytes(b"not ours to remove")
    lifecycle.remove_arena(untiered)
    assert arena_path(untiered, ARENA_ID).exists()


def test_local_serve_starts_ray_then_serve_and_stops_both_and_the_arena(
    calls: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    config = config_with_tiers(tmp_path)
    arena_path(config, ARENA_ID).write_bytes(b"arena")
    settings = ServeSettings(port=8123)
    with lifecycle.local_serve(settings, config=config) as url:
        assert url == "http://127.0.0.1:8123"
    assert names(calls) == ["ray.init", "serve.start", "serve.shutdown", "ray.shutdown"]
    assert calls[0][1] == lifecycle.local_ray_options()
    assert calls[1][1] == lifecycle.serve_options(settings)
    assert not arena_path(config, ARENA_ID).exists()
    assert logging.getLogger(lifecycle.SERVE_LOGGER).level == logging.WARNING


def test_deploy_runs_the_configs_application_under_its_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = config_with_tiers(tmp_path)
    checkpoints = {e.name: tmp_path for e in config.experts}
    application = object()
    built: list[tuple[CoEConfig, dict[str, Path]]] = []
    ran: list[tuple[Any, dict[str, Any]]] = []

    def build_app(config: CoEConfig, checkpoints: dict[str, Path]) -> object:
        built.append((config, checkpoints))
        return application

    monkeypatch.setattr("cluster.serve.app.build_app", build_app)
    monkeypatch.setattr(serve, "run", lambda app, **options: ran.append((app, options)))
    lifecycle.deploy(config, checkpoints)
    assert built == [(config, checkpoints)]
    assert ran == [(application, {"name": config.serve.app_name, "route_prefix": "/"})]


def test_local_serve_can_leave_serve_logs_alone(
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    serve_logger = logging.getLogger(lifecycle.SERVE_LOGGER)
    serve_logger.setLevel(logging.INFO)
    with lifecycle.local_serve(ServeSettings(port=8123), quiet_serve_logs=False):
        pass
    assert serve_logger.level == logging.INFO


def test_shutdown_stops_ray_and_removes_the_arena_when_serve_fails_to_stop(
    calls: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing() -> None:
        raise RuntimeError("controller gone")

    monkeypatch.setattr(serve, "shutdown", failing)
    config = config_with_tiers(tmp_path)
    arena_path(config, ARENA_ID).write_bytes(b"arena")
    with pytest.raises(RuntimeError, match="controller gone"):
        lifecycle.shutdown(config)
    assert names(calls) == ["ray.shutdown"]
    assert not arena_path(config, ARENA_ID).exists()


def test_local_ray_passes_its_options_and_starts_no_serve(
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    with lifecycle.local_ray(logging_level=None, log_to_driver=False, object_store_memory=7):
        pass
    assert calls == [
        (
            "ray.init",
            lifecycle.local_ray_options(
                logging_level=None, log_to_driver=False, object_store_memory=7
            ),
        ),
        ("ray.shutdown", {}),
    ]


def test_undeploy_deletes_the_application_and_gives_the_arena_back(
    calls: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    config = config_with_tiers(tmp_path)
    arena_path(config, ARENA_ID).write_bytes(b"arena")
    lifecycle.undeploy("bench", config)
    assert names(calls) == ["serve.delete"] and not arena_path(config, ARENA_ID).exists()


def test_joined_is_a_quiet_driver_that_always_leaves(
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    with pytest.raises(KeyError), lifecycle.joined("auto", unavailable=Unavailable):
        raise KeyError("the body failed")
    assert calls == [
        ("ray.init", {"address": "auto", **lifecycle.JOIN_OPTIONS}),
        ("ray.shutdown", {}),
    ]
    assert lifecycle.JOIN_OPTIONS == {"logging_level": logging.ERROR, "log_to_driver": False}


@pytest.mark.parametrize("error", [ConnectionError("nothing there"), RuntimeError("no GCS")])
def test_joined_turns_no_running_instance_into_the_callers_error(
    calls: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def fail(**_: Any) -> None:
        raise error

    monkeypatch.setattr(ray, "init", fail)
    with pytest.raises(Unavailable) as raised, lifecycle.joined("auto", unavailable=Unavailable):
        pytest.fail("the body must not run")
    assert raised.value.args == (error,)
    assert names(calls) == []  # nothing to shut down


def test_joined_leaves_a_refused_token_to_refused_or_raises_it(
    calls: list[tuple[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**_: Any) -> None:
        raise AuthenticationError("Token authentication failed")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(AuthenticationError), lifecycle.joined("auto", unavailable=Unavailable):
        pass

    def refused(error: AuthenticationError) -> Exception:
        return Unavailable(f"refused: {error.message}")

    joined = lifecycle.joined("auto", unavailable=RuntimeError, refused=refused)
    with pytest.raises(Unavailable, match="refused: Token authentication failed"), joined:
        pass


def test_remove_arena_leaves_alone_an_arena_a_running_cluster_maps(tmp_path: Path) -> None:
    config = config_with_tiers(tmp_path)
    running = DeviceArena.create_file(arena_path(config, "0000000000bb"), 4096)
    stopped = arena_path(config, ARENA_ID)
    stopped.write_bytes(b"arena")
    assert lifecycle.remove_arena(config, settle_s=0.3) == [stopped]
    assert arena_path(config, "0000000000bb").exists()
    running.close()
    assert lifecycle.remove_arena(config, settle_s=0.3) == [arena_path(config, "0000000000bb")]

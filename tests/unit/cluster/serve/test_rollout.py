"""Deploying with a deadline: running, failed and stuck applications, without a cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from cluster.serve import rollout


@dataclass
class _Deployment:
    status: str
    message: str = ""


@dataclass
class _App:
    status: str
    deployments: dict[str, _Deployment] = field(default_factory=dict)
    message: str = ""


class _Serve:
    """`serve.status()` answering a scripted sequence of application states."""

    def __init__(self, states: list[_App | None]) -> None:
        self.states = states
        self.asked = 0

    def status(self) -> Any:
        state = self.states[min(self.asked, len(self.states) - 1)]
        self.asked += 1
        applications = {} if state is None else {"app": state}
        return type("Status", (), {"applications": applications})()


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(rollout, "run_without_waiting", lambda *args: calls.append(args))
    monkeypatch.setattr(rollout, "POLL_S", 0.0)
    return calls


def _use(monkeypatch: pytest.MonkeyPatch, serve: _Serve) -> None:
    from ray import serve as ray_serve

    monkeypatch.setattr(ray_serve, "status", serve.status)


def test_returns_once_the_application_runs(
    monkeypatch: pytest.MonkeyPatch, deployed: list[tuple[Any, ...]]
) -> None:
    serve = _Serve([None, _App("DEPLOYING"), _App("RUNNING")])
    _use(monkeypatch, serve)
    rollout.deploy_and_wait("application", "app", "/", 60, progress=print)  # type: ignore[arg-type]
    assert deployed == [("application", "app", "/")] and serve.asked == 3


def test_a_failed_deployment_is_named_with_serves_message(
    monkeypatch: pytest.MonkeyPatch, deployed: list[tuple[Any, ...]]
) -> None:
    failed = _App(
        "DEPLOY_FAILED",
        {
            "router": _Deployment("HEALTHY"),
            "expert-x": _Deployment("DEPLOY_FAILED", "replica constructor raised ValueError"),
        },
    )
    _use(monkeypatch, _Serve([_App("DEPLOYING"), failed]))
    with pytest.raises(rollout.RolloutFailed) as caught:
        rollout.deploy_and_wait("application", "app", "/", 60, progress=print)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "expert-x DEPLOY_FAILED (replica constructor raised ValueError)" in message
    assert "router" not in message and "apply the previous one" in message


def test_a_deployment_that_never_starts_fails_at_the_deadline_with_progress(
    monkeypatch: pytest.MonkeyPatch, deployed: list[tuple[Any, ...]]
) -> None:
    stuck = _App(
        "DEPLOYING",
        {
            "expert-x": _Deployment(
                "UPDATING", "Deployment 'expert-x' has 1 replica that cannot be scheduled"
            )
        },
    )
    _use(monkeypatch, _Serve([stuck]))
    monkeypatch.setattr(rollout, "PROGRESS_EVERY_S", 0.0)
    said: list[str] = []
    with pytest.raises(rollout.RolloutFailed) as caught:
        rollout.deploy_and_wait("application", "app", "/", 0.05, progress=said.append)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "not running 0.05 s after the apply" in message
    assert (
        "expert-x UPDATING (Deployment 'expert-x' has 1 replica that cannot be scheduled)"
        in message
    )
    assert said and all("expert-x" in line for line in said)


def test_a_config_serve_refuses_outright_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve.exceptions import RayServeException

    def refuse(*_args: Any) -> None:
        raise RayServeException('Prefix / is being used by application "coe".')

    monkeypatch.setattr(rollout, "run_without_waiting", refuse)
    with pytest.raises(rollout.RolloutFailed, match="refused application 'app': Prefix / is being"):
        rollout.deploy_and_wait("application", "app", "/", 60, progress=print)  # type: ignore[arg-type]


def test_a_running_status_counts_only_once_it_lists_every_new_deployment(
    monkeypatch: pytest.MonkeyPatch, deployed: list[tuple[Any, ...]]
) -> None:
    """Serve may still report the previous version RUNNING before it creates what the
    new one adds: an apply must not call that done."""
    old = _App("RUNNING", {"router": _Deployment("HEALTHY")})
    new = _App("RUNNING", {"router": _Deployment("HEALTHY"), "expert-x": _Deployment("HEALTHY")})
    serve = _Serve([old, old, new])
    _use(monkeypatch, serve)
    monkeypatch.setattr(rollout, "deployment_names", lambda _app: {"router", "expert-x"})
    rollout.deploy_and_wait("application", "app", "/", 60, progress=print)  # type: ignore[arg-type]
    assert serve.asked == 3


def test_the_deployments_of_a_graph_are_found_through_its_arguments() -> None:
    from ray import serve

    @serve.deployment
    class Leaf:
        pass

    @serve.deployment
    class Middle:
        def __init__(self, leaf: Any) -> None:
            self.leaf = leaf

    @serve.deployment
    class Root:
        def __init__(self, middle: Any, experts: dict[str, Any], pair: list[Any]) -> None:
            self.parts = (middle, experts, pair)

    leaf = Leaf.bind()
    application = Root.bind(
        Middle.bind(leaf),
        {"a": Leaf.options(name="expert-a").bind()},
        [leaf, Leaf.options(name="other").bind()],
    )
    assert rollout.deployment_names(application) == {"Root", "Middle", "Leaf", "expert-a", "other"}

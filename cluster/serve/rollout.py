"""Deploying an application and waiting, bounded, until Serve runs it.

`serve.run` waits without a bound: a replica that can never be placed (a resource no
node has), or one that keeps failing to start under a generous retry count, would hold
the operator's `coe apply` forever. Here the wait has a deadline, progress is shown
while it lasts, and a failure names the deployments that did not come up and what
Serve says about each.

What a failed rollout leaves: Serve keeps the new config as its target (it goes on
trying); deployments the config did not change keep their replicas and serve. Going
back means applying the previous config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster.serve.ray_internals import bound_deployment, run_without_waiting

if TYPE_CHECKING:
    from ray.serve import Application

POLL_S = 1.0
# How often a still-deploying rollout says what it waits for.
PROGRESS_EVERY_S = 15.0


class RolloutFailed(RuntimeError):
    """The application did not reach RUNNING: it failed, or the deadline passed first."""


def deploy_and_wait(
    application: Application,
    name: str,
    route_prefix: str | None,
    timeout_s: float,
    progress: Callable[[str], None] = print,
) -> None:
    """Deploy `application` as `name`; return once it runs, else raise `RolloutFailed`."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        run_without_waiting(application, name, route_prefix)
    except RayServeException as error:  # refused outright, e.g. a route prefix in use
        cause = getattr(error, "cause", None) or error  # not the remote traceback
        raise RolloutFailed(f"Serve refused application {name!r}: {cause}") from None
    # Serve may still report the previous version RUNNING before it has created the
    # deployments this one adds: only a RUNNING status that lists them all counts.
    expected = deployment_names(application)
    deadline = time.monotonic() + timeout_s
    next_word = time.monotonic() + PROGRESS_EVERY_S
    while True:
        status = serve.status().applications.get(name)
        state = _named(status.status) if status is not None else "NOT_STARTED"
        if state == "RUNNING" and status is not None and expected <= set(status.deployments):
            return
        if state == "RUNNING":
            state = "DEPLOYING"  # Serve has not created every new deployment yet
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RolloutFailed(
                f"application {name!r} failed to deploy ({state}): {describe(status)}. "
                "Deployments this config did not change keep serving; fix the config "
                "and apply it again, or apply the previous one"
            )
        now = time.monotonic()
        if now >= deadline:
            raise RolloutFailed(
                f"application {name!r} was not running {timeout_s:g} s after the apply "
                f"({state}): {describe(status)}. Serve keeps trying to reach this config; "
                "deployments it did not change keep serving. Apply the previous config to "
                "go back, or raise --timeout if the deployments only need longer"
            )
        if now >= next_word:
            progress(f"waiting for {name!r} ({state}): {describe(status)}")
            next_word = now + PROGRESS_EVERY_S
        time.sleep(POLL_S)


def deployment_names(application: Application) -> set[str]:
    """Every deployment an application graph binds: its own and its arguments', nested."""
    names: set[str] = set()
    pending: list[Any] = [application]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif _is_application(item):
            deployment = bound_deployment(item)
            if deployment.name not in names:
                names.add(deployment.name)
                pending.extend(deployment.init_args)
                pending.extend(dict(deployment.init_kwargs).values())  # typed a tuple, is a dict
    return names


def _is_application(item: Any) -> bool:
    from ray.serve import Application

    return isinstance(item, Application)


def describe(status: Any) -> str:
    """The deployments of an application status that are not healthy, and why."""
    if status is None:
        return "Serve has not started it yet"
    waiting = [
        f"{name} {_named(deployment.status)}"
        + (f" ({deployment.message.strip()})" if deployment.message else "")
        for name, deployment in sorted(status.deployments.items())
        if _named(deployment.status) != "HEALTHY"
    ]
    if waiting:
        return "; ".join(waiting)
    return status.message or "no deployment reports a problem"


def _named(state: Any) -> str:
    """A Serve status enum's value ("RUNNING"); `str()` of a str-enum gives its class too."""
    return str(getattr(state, "value", state))

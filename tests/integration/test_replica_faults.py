"""Whole replica processes of the demo application killed: the router, the ingress.

Both run on the session's demo cluster (no application of their own). Each test kills
one replica with SIGKILL, checks what a client sees (a 503 with Retry-After, or an
ended stream; never a 500, never a hang), and waits, bounded, until Serve has replaced
the replica and a normal request succeeds again, since later tests share the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration

# Any single read longer than this is a hang (a whole answer here takes seconds).
CLIENT_TIMEOUT_S = 60.0
# How long Serve may take to notice a dead replica and start its replacement.
RECOVERY_S = 180.0
# Long enough that a routed request is still inside the router when it is killed.
STALL_S = 300.0


def replica_actor(app: str, deployment: str) -> Any:
    """The one running replica actor of `deployment` in `app` (Serve names replica
    actors SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    found = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].partition("::")[2].split("#")[:2] == [app, deployment]
    ]
    assert len(found) == 1, found
    return ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])


def _pid(_actor: Any) -> int:
    return os.getpid()


def replica_pid(app: str, deployment: str) -> int:
    import ray

    pid: int = ray.get(replica_actor(app, deployment).__ray_call__.remote(_pid), timeout=60)
    return pid


def _stall_routing(replica_actor: Any, stall_s: float) -> None:
    """Runs inside the router replica: every batch from now on counts itself and then
    sleeps, so a request sent next is inside the router when the test kills it."""
    router_replica = replica_actor._replica_impl._user_callable_wrapper._callable
    router_replica.stalled_batches = 0

    def stalled(prompts: list[str]) -> list[Any]:
        router_replica.stalled_batches += 1
        time.sleep(stall_s)
        raise RuntimeError("the stalled router was never killed")

    router_replica.router.route_batch = stalled


def _stalled_batches(replica_actor: Any) -> int:
    router_replica = replica_actor._replica_impl._user_callable_wrapper._callable
    return int(router_replica.stalled_batches)


def chat_body(model: str, max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


ROUTE_BODY = {"prompt": "What is the capital of France?"}


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=CLIENT_TIMEOUT_S)


def assert_refused_for_now(response: httpx.Response) -> None:
    """A 503 a client can act on: retry after the time given."""
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1, response.headers
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"], error


def assert_unavailable(response: httpx.Response) -> None:
    """A 503, from the ingress or from Serve's proxy while no ingress replica runs."""
    assert response.status_code == 503, response.text


def served_again(
    url: str,
    body: dict[str, Any],
    within_s: float,
    refused: Callable[[httpx.Response], None] = assert_refused_for_now,
) -> tuple[int, list[int]]:
    """POST `body` (each try bounded by the client timeout) until it gets a 200; every
    other answer must pass `refused`. Returns the tries and their statuses."""
    deadline = time.monotonic() + within_s
    statuses: list[int] = []
    while True:
        response = post(url, body)
        statuses.append(response.status_code)
        if response.status_code == 200:
            return len(statuses), statuses
        refused(response)
        assert time.monotonic() < deadline, f"not served within {within_s}s: {statuses}"
        time.sleep(0.5)


@pytest.mark.timeout(420)
def test_a_killed_router_replica_answers_503_and_is_replaced(cluster: RunningCluster) -> None:
    """A routed request inside the router when it dies gets a 503 with Retry-After (not
    a 500); requests sent while Serve replaces it wait for the new replica or get a 503;
    none hangs, and routed requests succeed again."""
    import ray
    from ray import serve

    app = cluster.app_name
    route_url = f"{cluster.base_url}/v1/route"
    chat_url = f"{cluster.base_url}/v1/chat/completions"
    assert post(route_url, ROUTE_BODY).status_code == 200
    handle = serve.get_deployment_handle("router", app_name=app)
    pid = handle.info.remote().result(timeout_s=60)["pid"]
    router = replica_actor(app, "router")
    ray.get(router.__ray_call__.remote(_stall_routing, STALL_S), timeout=60)

    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(post, chat_url, chat_body("coe"))
        deadline = time.monotonic() + 60
        while ray.get(router.__ray_call__.remote(_stalled_batches), timeout=60) == 0:
            assert time.monotonic() < deadline, "the request never reached the router"
            assert not in_flight.done(), in_flight.result().text
            time.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        response = in_flight.result(timeout=CLIENT_TIMEOUT_S + 10)
    print(
        f"in flight at the kill: {response.status_code} after "
        f"{time.monotonic() - killed_at:.1f}s: {response.text[:300]}"
    )
    assert_refused_for_now(response)
    assert response.json()["error"]["code"] == "router_unavailable"

    tries, statuses = served_again(route_url, ROUTE_BODY, RECOVERY_S)
    print(
        f"/v1/route served again after {tries} tries ({statuses}), "
        f"{time.monotonic() - killed_at:.1f}s after the kill"
    )
    answer = post(chat_url, chat_body("coe"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["coe"]["routed"] is True
    assert handle.info.remote().result(timeout_s=60)["pid"] != pid


def _has_content(event: Any) -> bool:
    return isinstance(event, dict) and bool(
        event.get("choices") and event["choices"][0]["delta"].get("content")
    )


def read_stream_killing(url: str, body: dict[str, Any], pid: int) -> tuple[list[Any], str, float]:
    """Stream `body`, SIGKILL `pid` after the first content chunk and read on: the events
    received, how the stream ended, and the seconds from the kill to that end."""
    events: list[Any] = []
    killed_at: float | None = None
    ended = "the stream ended normally"
    try:
        with httpx.stream("POST", url, json=body, timeout=CLIENT_TIMEOUT_S) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if killed_at is None and _has_content(events[-1]):
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.monotonic()
    except httpx.TimeoutException as error:
        raise AssertionError(f"the stream hung after the kill: {error!r}; {events[-3:]}") from None
    except httpx.HTTPError as error:  # the connection closed mid-body
        ended = f"{type(error).__name__}: {error}"
    assert killed_at is not None, f"the stream ended before any content: {events}"
    return events, ended, time.monotonic() - killed_at


@pytest.mark.timeout(420)
def test_an_ingress_replica_killed_mid_stream_ends_the_stream(cluster: RunningCluster) -> None:
    """Through Serve's HTTP proxy: the client's stream ends (an error, or the body cut
    off) soon after the kill, never with a finished answer and never by hanging; Serve
    starts a new ingress and the next request succeeds."""
    app = cluster.app_name
    chat_url = f"{cluster.base_url}/v1/chat/completions"
    assert post(chat_url, chat_body("generalist")).status_code == 200
    pid = replica_pid(app, "ingress")
    # The generalist is dedicated and pinned: no switch before the first chunk. With
    # ignore_eos the answer runs to max_tokens, so the kill lands well before its end.
    body = {**chat_body("generalist", max_tokens=200, stream=True), "ignore_eos": True}
    events, ended, after_s = read_stream_killing(chat_url, body, pid)
    print(f"{ended}, {after_s:.1f}s after the kill; last events {events[-2:]}")
    assert after_s < CLIENT_TIMEOUT_S
    finished = [
        e
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")
    ]
    assert not finished, "a killed ingress cannot have finished the answer"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors or ended != "the stream ended normally", events[-3:]

    tries, statuses = served_again(
        chat_url, chat_body("generalist"), RECOVERY_S, refused=assert_unavailable
    )
    print(f"served again after {tries} tries ({statuses})")
    assert replica_pid(app, "ingress") != pid

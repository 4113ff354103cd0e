"""A router replica that dies under a request: `HandleBackend` answers 503 with
Retry-After (`router_unavailable`), over HTTP too, instead of a bare 500. Fake handles,
no Ray started; the real kill is tests/integration/test_replica_faults.py."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from cluster.config import ServeSettings
from cluster.ingress.api_errors import RouterUnavailable
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from cluster.serve.handle_backend import HandleBackend

DEAD_ROUTER: list[Exception] = [
    ActorDiedError(),
    ActorUnavailableError("Actor is unavailable.", b"\0" * 16),
    DeploymentUnavailableError(DeploymentID(name="router", app_name="coe")),
]
CHAT = {"model": "coe", "messages": [{"role": "user", "content": "Hello"}]}


class _Route:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def _fail(self) -> Any:
        raise self.error

    def remote(self, prompt: str) -> Any:
        return self._fail()


class DeadRouter:
    """`handle.route.remote(...)` fails as a dead router replica's handle does."""

    def __init__(self, error: Exception) -> None:
        self.route = _Route(error)


def backend(error: Exception) -> HandleBackend:
    return HandleBackend(DeadRouter(error), {"general": None}, retry_after_s=3)  # type: ignore[arg-type, dict-item]


@pytest.mark.parametrize("error", DEAD_ROUTER, ids=lambda e: type(e).__name__)
def test_a_dead_router_is_a_503_to_retry(error: Exception) -> None:
    import asyncio

    with pytest.raises(RouterUnavailable) as refused:
        asyncio.run(backend(error).route("Hello"))
    assert refused.value.status_code == 503
    assert refused.value.code == "router_unavailable"
    assert refused.value.headers() == {"Retry-After": "3"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/route"])
def test_over_http_a_dead_router_answers_503_with_retry_after(path: str) -> None:
    client = TestClient(build_http_app(CoEService(ServeSettings(), backend(ActorDiedError()))))
    body = {"model": "coe", "prompt": "Hello"} if path == "/v1/completions" else CHAT
    if path == "/v1/route":
        body = {"prompt": "Hello"}
    response = client.post(path, json=body)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "3"
    error = response.json()["error"]
    assert error["code"] == "router_unavailable" and error["type"] == "server_error"
    streamed = client.post(path, json={**body, "stream": True}) if path != "/v1/route" else None
    if streamed is not None:  # refused before the stream opens: a real status
        assert streamed.status_code == 503

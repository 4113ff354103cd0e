"""The optional API key: the gate itself and the HTTP API behind it."""

from __future__ import annotations

import base64
import hmac
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cluster.config import ServeSettings
from cluster.ingress.auth import ApiKeyGate, key_fingerprint
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from tests.unit.fakes import FakeBackend

KEY = "sk-test-5f3c9e1d2b7a4c6e"
LIMITS = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
GOOD = {"model": "coe", "messages": [{"role": "user", "content": "what is the sum of 2 and 2"}]}

REFUSED_HEADERS: list[tuple[str, dict[str, str]]] = [
    ("missing", {}),
    ("empty", {"Authorization": ""}),
    ("bare key", {"Authorization": KEY}),
    ("bearer without key", {"Authorization": "Bearer"}),
    ("bearer with blank key", {"Authorization": "Bearer   "}),
    ("wrong key", {"Authorization": "Bearer sk-wrong"}),
    ("key prefix", {"Authorization": f"Bearer {KEY[:-1]}"}),
    ("key with suffix", {"Authorization": f"Bearer {KEY}x"}),
    ("other scheme", {"Authorization": f"Token {KEY}"}),
    ("basic", {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()}),
    ("basic with raw key", {"Authorization": f"Basic {KEY}"}),
    ("non-ascii", {"Authorization": "Bearer sk-\u00e9\u00e9"}),
]


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(["general", "math"])


@pytest.fixture
def locked(backend: FakeBackend) -> TestClient:
    return TestClient(build_http_app(CoEService(LIMITS, backend), ApiKeyGate(KEY)))


# --- the gate --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, ""])
def test_gate_without_key_is_open(key: str | None) -> None:
    gate = ApiKeyGate(key)
    assert gate.open
    assert gate.admits(None) and gate.admits("Bearer anything") and gate.admits("Basic x")


@pytest.mark.parametrize("value", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY} "])
def test_gate_admits_the_bearer_key(value: str) -> None:
    gate = ApiKeyGate(KEY)
    assert not gate.open
    assert gate.admits(value)


@pytest.mark.parametrize(
    "headers", [h for _, h in REFUSED_HEADERS], ids=[label for label, _ in REFUSED_HEADERS]
)
def test_gate_refuses_everything_else(headers: dict[str, str]) -> None:
    assert not ApiKeyGate(KEY).admits(headers.get("Authorization"))


def test_configured_key_is_stripped_and_a_blank_one_is_refused() -> None:
    assert ApiKeyGate(f"{KEY}\n").admits(f"Bearer {KEY}")
    with pytest.raises(ValueError, match="blank"):
        ApiKeyGate("  \n")


@pytest.mark.parametrize("value", [None, "Basic abc", f"Bearer {KEY[:-1]}", f"Bearer {KEY}"])
def test_every_check_is_a_constant_time_comparison(
    value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[bytes] = []
    original = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append(b)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    ApiKeyGate(KEY).admits(value)
    assert compared == [KEY.encode()]  # one comparison, whatever was presented


def test_key_never_shows_in_repr_or_str() -> None:
    gate = ApiKeyGate(KEY)
    assert KEY not in repr(gate) and KEY not in str(gate)
    assert repr(gate) == "ApiKeyGate(open=False)"


def test_settings_never_show_the_key() -> None:
    settings = ServeSettings(api_key=KEY)
    assert settings.resolved_api_key() == KEY
    assert KEY not in repr(settings)
    assert KEY not in str(settings.model_dump(mode="json"))


# --- the HTTP API behind it ------------------------------------------------------------


def test_without_a_key_everything_is_open(backend: FakeBackend) -> None:
    client = TestClient(build_http_app(CoEService(LIMITS, backend)))
    assert client.get("/v1/models").status_code == 200
    assert client.post("/v1/chat/completions", json=GOOD).status_code == 200
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    "headers", [h for _, h in REFUSED_HEADERS], ids=[label for label, _ in REFUSED_HEADERS]
)
def test_refusals_say_nothing_and_touch_nothing(
    locked: TestClient, backend: FakeBackend, headers: dict[str, str]
) -> None:
    raw = {name.encode(): value.encode() for name, value in headers.items()}  # UTF-8 on the wire
    response = locked.post("/v1/chat/completions", json=GOOD, headers=raw)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {
            "message": "a valid API key is required",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert KEY not in response.text
    assert all(KEY not in value for value in response.headers.values())
    assert backend.calls == []


def test_the_key_opens_every_endpoint(locked: TestClient, backend: FakeBackend) -> None:
    assert locked.post("/v1/chat/completions", json=GOOD, headers=bearer()).status_code == 200
    assert locked.get("/v1/models", headers=bearer()).status_code == 200
    route = locked.post("/v1/route", json={"prompt": "hello"}, headers=bearer())
    assert route.status_code == 200
    assert [c[0] for c in backend.calls] == ["route", "generate", "route"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/route"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/openapi.json"),
        ("GET", "/nothing-here"),  # an unknown path says 401, not 404: no probing
    ],
)
def test_only_healthz_is_open(locked: TestClient, method: str, path: str) -> None:
    assert locked.request(method, path).status_code == 401
    assert locked.request(method, path, headers=bearer()).status_code != 401


def test_healthz_is_open(locked: TestClient) -> None:
    assert locked.get("/healthz").json() == {"status": "ok"}


def test_under_a_route_prefix_only_its_healthz_is_open(backend: FakeBackend) -> None:
    app = build_http_app(CoEService(LIMITS, backend), ApiKeyGate(KEY))
    client = TestClient(app, root_path="/limits")
    assert client.get("/limits/healthz").status_code == 200
    assert client.get("/limits/v1/models").status_code == 401
    assert client.get("/limits/v1/models", headers=bearer()).status_code == 200
    assert client.get("/limits/healthz/../v1/models").status_code == 401


def test_key_is_never_logged(
    locked: TestClient, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        locked.post("/v1/chat/completions", json=GOOD, headers=bearer())
        locked.post("/v1/chat/completions", json=GOOD, headers=bearer("sk-wrong"))
        locked.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert caplog.records  # something was logged at DEBUG, and none of it is the key
    assert KEY not in caplog.text


def test_a_key_fingerprint_identifies_the_key_without_holding_it() -> None:
    fingerprint = key_fingerprint("correct horse")
    assert fingerprint is not None and "correct" not in fingerprint
    assert key_fingerprint(" correct horse\n") == fingerprint  # the gate strips keys too
    assert key_fingerprint("correct horsf") != fingerprint
    assert key_fingerprint(None) is None and key_fingerprint("  ") is None
    assert ApiKeyGate("correct horse").fingerprint == fingerprint
    assert ApiKeyGate(None).fingerprint is None

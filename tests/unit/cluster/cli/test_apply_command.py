"""`coe apply`'s API-key guard, without a cluster: the running side is faked."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.cli import apply_command
from cluster.cli.apply_command import api_key_change, check_key_change
from cluster.cli.router_commands import CommandInputError
from cluster.config import CoEConfig, parse_config
from cluster.ingress.auth import key_fingerprint
from tests.unit.cluster.test_config import demo_data

KEY_ENV = "COE_API_KEY"


def test_every_change_of_who_may_call_is_named() -> None:
    one, two = key_fingerprint("one"), key_fingerprint("two")
    assert api_key_change(one, one, KEY_ENV) is None
    assert api_key_change(None, None, KEY_ENV) is None
    assert "OFF" in str(api_key_change(one, None, KEY_ENV))
    assert f"${KEY_ENV} is not set" in str(api_key_change(one, None, KEY_ENV))
    assert "ON" in str(api_key_change(None, one, KEY_ENV))
    assert "CHANGES" in str(api_key_change(one, two, KEY_ENV))


def running_cluster(
    monkeypatch: pytest.MonkeyPatch, running_key: str | None, *, answers: bool = True
) -> list[str]:
    """Fake the running application; returns the lines the command says."""
    said: list[str] = []
    monkeypatch.setattr(apply_command, "app_is_running", lambda app: True)

    def call(app: str, deployment: str, method: str) -> tuple[Any, str | None]:
        assert (deployment, method) == ("ingress", "api_key_fingerprint")
        if not answers:
            return None, "ingress.api_key_fingerprint() failed: TimeoutError"
        return key_fingerprint(running_key), None

    monkeypatch.setattr(apply_command, "call_deployment", call)
    monkeypatch.setattr(apply_command, "say", said.append)
    return said


def config_with_key(monkeypatch: pytest.MonkeyPatch, key: str | None) -> CoEConfig:
    if key is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, key)
    return parse_config(demo_data())


@pytest.mark.parametrize(
    ("running", "applied", "fragment"),
    [("secret", None, "OFF"), ("secret", "other", "CHANGES"), (None, "secret", "ON")],
)
def test_an_unmeant_key_change_is_refused_and_a_meant_one_is_said(
    monkeypatch: pytest.MonkeyPatch, running: str | None, applied: str | None, fragment: str
) -> None:
    said = running_cluster(monkeypatch, running)
    config = config_with_key(monkeypatch, applied)
    with pytest.raises(CommandInputError, match=f"{fragment}.*nothing was applied"):
        check_key_change(config, allowed=False)
    assert said == []
    check_key_change(config, allowed=True)
    assert len(said) == 1 and fragment in said[0] and "--change-api-key" in said[0]


def test_the_same_key_applies_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    said = running_cluster(monkeypatch, "secret")
    check_key_change(config_with_key(monkeypatch, " secret\n"), allowed=False)
    assert said == []


def test_a_key_that_cannot_be_checked_is_not_assumed_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = running_cluster(monkeypatch, "secret", answers=False)
    config = config_with_key(monkeypatch, "secret")
    with pytest.raises(CommandInputError, match="cannot tell whether"):
        check_key_change(config, allowed=False)
    check_key_change(config, allowed=True)
    assert "unknown" in said[0]


def test_a_first_apply_has_no_running_key_to_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply_command, "app_is_running", lambda app: False)
    monkeypatch.setattr(apply_command, "call_deployment", pytest.fail)
    check_key_change(config_with_key(monkeypatch, None), allowed=False)

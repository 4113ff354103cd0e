"""Unit tests never start Ray: any attempt fails the test loudly."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not start Ray (ray.init was called)")

    monkeypatch.setattr(ray, "init", refuse)

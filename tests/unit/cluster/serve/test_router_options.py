"""The router deployment's queue bounds, from the bound graph (never run: no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.config import RouterSettings, parse_config
from cluster.serve.app import build_app
from cluster.serve.ray_internals import bound_deployment, deployment_config
from tests.unit.cluster.test_config import demo_data


def router_of(tmp_path: Path, **router: Any) -> Any:
    data = demo_data()
    data.setdefault("router", {}).update(router)
    config = parse_config(data)
    ingress = bound_deployment(build_app(config, {e.name: tmp_path for e in config.experts}))
    return bound_deployment(ingress.init_args[1])


def test_router_queue_is_bounded_by_its_setting(tmp_path: Path) -> None:
    assert RouterSettings().max_queued_requests == 256
    assert RouterSettings.model_fields["max_queued_requests"].description
    router = router_of(tmp_path, max_queued_requests=40)
    assert router.name == "router"
    assert router.max_queued_requests == 40
    assert deployment_config(router).max_queued_requests == 40


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_a_router_replica_takes_a_whole_batch_at_once(tmp_path: Path, batch: int) -> None:
    # Serve's default of 5 ongoing requests would cap every batch at 5 prompts.
    router = router_of(tmp_path, max_batch_size=batch)
    assert router.max_ongoing_requests >= batch


def test_router_queue_needs_room_for_one_request() -> None:
    with pytest.raises(ValidationError):
        RouterSettings(max_queued_requests=0)

"""The expert autoscaling policy on hand-built views and real Serve contexts, without Ray."""

from __future__ import annotations

import builtins
import itertools
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.serve.autoscaling import (
    DOWN_SINCE,
    IDLE_SINCE,
    UP_SINCE,
    AutoscalingPolicyError,
    ExpertAutoscalingPolicy,
    PolicySettings,
    PolicyView,
    decide,
    expert_policy,
    serve_autoscaling_config,
    settings_from_autoscaling_config,
    simulate,
    view_from_context,
)

PARK = PolicySettings(idle_mode="park", upscale_delay_s=1.0, downscale_delay_s=60.0)
ZERO = PolicySettings(idle_mode="zero", idle_s=10.0, upscale_delay_s=1.0, downscale_delay_s=60.0)


def view(**changes: Any) -> PolicyView:
    base = PolicyView(
        now_s=0.0,
        current_replicas=1,
        target_replicas=1,
        total_requests=0.0,
        queued_requests=0.0,
        target_ongoing_requests=2.0,
        min_replicas=1,
        max_replicas=4,
    )
    return replace(base, **changes)


def run_ticks(
    settings_: PolicySettings, ticks: Sequence[tuple[float, float]], **fixed: Any
) -> list[int]:
    """Decisions over (time, load) ticks, replicas starting instantly, state threaded."""
    ordered = fixed.pop("start", 1)
    state: dict[str, Any] = {}
    out = []
    for now, load in ticks:
        current = view(
            now_s=now,
            current_replicas=ordered,
            target_replicas=ordered,
            total_requests=load,
            **fixed,
        )
        ordered, state = decide(current, state, settings_)
        out.append(ordered)
    return out


# --- scaling up ---------------------------------------------------------------------------


def test_queued_requests_on_saturated_replicas_scale_up_at_once() -> None:
    slow = replace(PARK, upscale_delay_s=30.0)
    decision, state = decide(view(total_requests=6.0, queued_requests=2.0), {}, slow)
    assert decision == 3  # ceil(6 / 2), without waiting for the 30 s delay
    assert UP_SINCE not in state


def test_load_without_queue_waits_for_the_upscale_delay() -> None:
    ticks = [(0.0, 6.0), (0.5, 6.0), (1.0, 6.0)]
    assert run_ticks(PARK, ticks) == [1, 1, 3]


def test_upscale_clock_restarts_when_the_need_goes_away() -> None:
    ticks = [(0.0, 6.0), (0.5, 1.0), (1.0, 6.0), (1.5, 6.0), (2.0, 6.0)]
    assert run_ticks(PARK, ticks) == [1, 1, 1, 1, 3]


def test_scale_up_is_bounded_by_max_replicas() -> None:
    decision, _ = decide(view(total_requests=100.0, queued_requests=50.0), {}, PARK)
    assert decision == 4


def test_replicas_still_starting_count_as_capacity() -> None:
    # Three ordered, one running: queued requests are waiting for the starts, not a new need.
    starting = view(current_replicas=1, target_replicas=3, total_requests=8.0, queued_requests=4.0)
    decision, state = decide(starting, {}, PARK)
    assert decision == 3  # holds: no fast path while ordered replicas are starting
    assert state[UP_SINCE] == 0.0
    decision, _ = decide(replace(starting, now_s=1.0), state, PARK)
    assert decision == 4  # the need outlasted the upscale delay


# --- scaling down -------------------------------------------------------------------------


def test_scale_down_only_after_the_delay() -> None:
    ticks = [(float(t), 2.0) for t in range(0, 61, 5)]
    decisions = run_ticks(PARK, ticks, start=4)
    assert decisions[:-1] == [4] * (len(ticks) - 1)
    assert decisions[-1] == 2  # ceil(2 / (2 * 0.75))


def test_load_back_above_the_band_restarts_the_downscale_clock() -> None:
    ticks = [(float(t), 2.0) for t in range(0, 51, 10)] + [(55.0, 7.0)]
    ticks += [(float(t), 2.0) for t in range(60, 121, 5)]
    decisions = run_ticks(PARK, ticks, start=4)
    first_down = next(i for i, n in enumerate(decisions) if n < 4)
    assert ticks[first_down][0] == 120.0  # 60 s after the load fell again, not after 60 s


def test_each_step_down_waits_a_full_delay() -> None:
    ticks = [(float(t), 2.5) for t in range(0, 121, 10)]
    decisions = run_ticks(PARK, ticks, start=4)
    # 2.5 fits in 2 replicas at 75 % of target; one step at 60 s, none after.
    assert decisions[ticks.index((60.0, 2.5))] == 2
    assert decisions[-1] == 2


def test_no_flapping_on_a_noisy_load() -> None:
    rng = random.Random(7)
    loads = [5.0 + rng.uniform(-1.5, 1.5) for _ in range(600)]
    decisions = simulate(loads, PARK, tick_s=1.0, max_replicas=8)
    changes = [b - a for a, b in itertools.pairwise(decisions) if b != a]
    assert all(step > 0 for step in changes), f"went down on noise: {changes}"
    # It climbs to what the peaks need (at most one step per replica) and stays there.
    peak_need = math.ceil(max(loads) / 2.0)
    assert decisions[-1] <= peak_need
    assert len(changes) <= peak_need - 1


def test_the_same_noise_flaps_a_policy_without_hysteresis() -> None:
    # The check above can fail: with no gap between the thresholds the same noise flaps.
    rng = random.Random(7)
    loads = [5.0 + rng.uniform(-1.5, 1.5) for _ in range(600)]
    no_band = PolicySettings(upscale_delay_s=0.0, downscale_delay_s=0.0, downscale_utilisation=1.0)
    decisions = simulate(loads, no_band, tick_s=1.0, max_replicas=8)
    assert sum(1 for a, b in itertools.pairwise(decisions) if b < a) > 10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=200))
def test_any_load_stays_in_bounds_and_never_steps_down_early(loads: list[float]) -> None:
    decisions = simulate(loads, ZERO, tick_s=1.0, max_replicas=5)
    last_change_tick = 0
    previous = 0
    for tick, (load, ordered) in enumerate(zip(loads, decisions, strict=True)):
        assert 0 <= ordered <= 5
        if load > 1e-3:
            assert ordered >= 1
        if ordered < previous and previous > 1:
            assert tick - last_change_tick >= ZERO.downscale_delay_s
        if ordered != previous:
            last_change_tick = tick
        previous = ordered


# --- idle modes ---------------------------------------------------------------------------


def test_park_never_goes_below_one() -> None:
    loads = [3.0] * 5 + [0.0] * 2000
    decisions = simulate(loads, PARK, tick_s=1.0, min_replicas=0)
    assert min(decisions) == 1
    decision, _ = decide(view(target_replicas=0, current_replicas=0, min_replicas=0), {}, PARK)
    assert decision == 1


def test_zero_goes_to_zero_after_the_idle_window_and_back_on_a_request() -> None:
    busy, idle = 5, 30
    loads = [1.0] * busy + [0.0] * idle + [1.0]
    decisions = simulate(loads, ZERO, tick_s=1.0)
    first_zero = decisions.index(0)
    assert first_zero == busy + int(ZERO.idle_s)  # idle from tick `busy`, idle_s ticks later
    assert set(decisions[:first_zero]) == {1}
    assert decisions[-1] == 1


def test_zero_from_several_replicas_steps_to_one_then_zero() -> None:
    loads = [8.0] * 3 + [0.0] * 100
    decisions = simulate(loads, ZERO, tick_s=1.0, initial_replicas=4)
    assert decisions[2] == 4
    one = decisions.index(1)
    assert one == 3 + int(ZERO.downscale_delay_s)
    assert decisions[one + 1] == 0  # the idle window (10 s) already passed meanwhile


def test_zero_mode_wakes_from_zero_in_one_tick() -> None:
    asleep = view(current_replicas=0, target_replicas=0, min_replicas=0, total_requests=1.0)
    decision, _ = decide(asleep, {IDLE_SINCE: 0.0}, replace(ZERO, upscale_delay_s=600.0))
    assert decision == 1
    decision, _ = decide(replace(asleep, total_requests=9.0), {}, ZERO)
    assert decision == 4  # straight to what the load needs, within max


def test_capacity_adjusted_bounds_are_respected() -> None:
    bounded = {"min_replicas": 2, "max_replicas": 3}
    assert run_ticks(PARK, [(0.0, 50.0)], start=2, queued_requests=9.0, **bounded) == [3]
    idle = [(float(t), 0.0) for t in range(0, 200, 20)]
    assert min(run_ticks(ZERO, idle, start=3, **bounded)) == 2
    # Bounds that shrank under the current target apply at once.
    assert run_ticks(PARK, [(0.0, 4.0)], start=5, **bounded) == [3]


def test_simulated_ramp_goes_up_holds_and_comes_down() -> None:
    ramp = [float(x) for x in range(0, 13)] + [12.0] * 20 + [1.0] * 150
    decisions = simulate(ramp, PARK, tick_s=1.0, max_replicas=8, start_ticks=3)
    peak = max(decisions)
    assert peak == 6  # 12 requests / 2 per replica
    assert decisions[-1] == 1
    rise_end = decisions.index(peak)
    assert decisions[: rise_end + 1] == sorted(decisions[: rise_end + 1])


# --- state and settings -------------------------------------------------------------------


def test_serve_keys_in_state_pass_through_and_input_is_not_changed() -> None:
    state = {"__decision_counters": 3, "__decision_timestamp": None, DOWN_SINCE: 1.0}
    before = dict(state)
    _, new_state = decide(view(now_s=2.0, total_requests=6.0), state, PARK)
    assert state == before
    assert new_state["__decision_counters"] == 3
    assert DOWN_SINCE not in new_state and new_state[UP_SINCE] == 2.0


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"idle_mode": "sleep"}, "sleep"),
        ({"idle_s": -1.0}, "idle_s"),
        ({"upscale_delay_s": float("nan")}, "upscale_delay_s"),
        ({"downscale_delay_s": "60"}, "downscale_delay_s"),
        ({"downscale_utilisation": 0.0}, "downscale_utilisation"),
        ({"downscale_utilisation": 1.5}, "1.5"),
    ],
)
def test_bad_settings_name_the_bad_value(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(AutoscalingPolicyError, match=named):
        PolicySettings(**changes)


def test_unknown_policy_kwargs_are_rejected() -> None:
    with pytest.raises(AutoscalingPolicyError, match="idle_seconds"):
        ExpertAutoscalingPolicy(idle_mode="zero", idle_seconds=10)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"target_ongoing_requests": 0.0}, "target_ongoing_requests"),
        ({"min_replicas": 5}, "min_replicas"),
        ({"total_requests": -1.0}, "total_requests"),
        ({"current_replicas": 1.5}, "current_replicas"),
    ],
)
def test_bad_views_name_the_bad_value(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(AutoscalingPolicyError, match=named):
        view(**changes)


def test_corrupt_state_is_an_error_and_changes_nothing() -> None:
    state: dict[str, Any] = {UP_SINCE: "soon"}
    with pytest.raises(AutoscalingPolicyError, match="coe_up_since"):
        decide(view(total_requests=6.0), state, PARK)
    assert state == {UP_SINCE: "soon"}


def test_serve_config_rejects_a_mode_that_contradicts_min_replicas() -> None:
    with pytest.raises(AutoscalingPolicyError, match="min_replicas 0"):
        serve_autoscaling_config(ZERO, max_replicas=2, min_replicas=1)
    with pytest.raises(AutoscalingPolicyError, match="park"):
        serve_autoscaling_config(PARK, max_replicas=2, min_replicas=0)
    with pytest.raises(AutoscalingPolicyError, match="max_replicas"):
        serve_autoscaling_config(PARK, max_replicas=0)


# --- the Serve hooks on real Serve objects ------------------------------------------------


def context(
    config: AutoscalingConfig,
    *,
    now: float,
    replicas: int,
    total: float,
    queued: float = 0.0,
    state: dict[str, Any] | None = None,
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="expert-a"),
        deployment_name="expert-a",
        app_name="default",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=total,
        total_queued_requests=lambda: queued,  # Serve passes lazy callables too
        aggregated_metrics=None,
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now


def serve_ticks(
    policy: Callable[[AutoscalingContext], tuple[Any, dict[str, Any]]],
    config: AutoscalingConfig,
    clock: FakeClock,
    ticks: Sequence[tuple[float, float, float]],
    start: int,
) -> list[int]:
    """Run the policy the way Serve's controller does: its wrapper, then its bounds."""
    wrapped = _apply_autoscaling_config(policy)
    replicas = start
    state: dict[str, Any] = {}
    out = []
    for now, total, queued in ticks:
        clock.now = 1_000.0 + now
        ctx = context(config, now=clock.now, replicas=replicas, total=total, queued=queued)
        ctx.policy_state = state
        decision, state = wrapped(ctx)
        replicas = max(config.min_replicas, min(config.max_replicas, int(decision)))
        out.append(replicas)
    return out


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Serve's delay logic reads time.time(); give it the test's clock."""
    import ray.serve.autoscaling_policy as serve_policy

    fake = FakeClock()
    monkeypatch.setattr(serve_policy, "time", fake)
    return fake


def test_view_from_a_real_autoscaling_context() -> None:
    config = AutoscalingConfig(min_replicas=0, max_replicas=3, target_ongoing_requests=4)
    seen = view_from_context(context(config, now=5.0, replicas=2, total=7.0, queued=1.0))
    assert seen == PolicyView(5.0, 2, 2, 7.0, 1.0, 4.0, 0, 3)


def test_expert_policy_function_on_a_real_context() -> None:
    config = AutoscalingConfig(min_replicas=0, max_replicas=3, target_ongoing_requests=2)
    assert settings_from_autoscaling_config(config).idle_mode == "zero"
    decision, _ = expert_policy(context(config, now=0.0, replicas=0, total=1.0))
    assert decision == 1
    decision, state = expert_policy(context(config, now=0.0, replicas=1, total=0.0))
    assert decision == 0  # Serve's downscale_to_zero_delay_s is what holds it at 1
    assert state[IDLE_SINCE] == 0.0


def test_expert_policy_function_relies_on_serves_delays(clock: FakeClock) -> None:
    config = AutoscalingConfig(
        min_replicas=0, max_replicas=3, downscale_delay_s=5.0, downscale_to_zero_delay_s=8.0
    )
    ticks = [(float(t), 0.0, 0.0) for t in range(0, 20)]
    decisions = serve_ticks(expert_policy, config, clock, ticks, start=3)
    assert decisions.index(1) == 5
    # Serve's 1 -> 0 clock starts on the first tick that sees a target of 1.
    assert decisions.index(0) == 5 + 1 + 8


def test_expert_policy_class_through_serves_wrapper_keeps_its_own_clocks(
    clock: FakeClock,
) -> None:
    policy_settings = replace(ZERO, downscale_delay_s=30.0, idle_s=10.0)
    config = AutoscalingConfig(**serve_autoscaling_config(policy_settings, max_replicas=4))
    policy: Any = _resolve_policy_callable(config.policy)
    # Serve unpickles its own copy of the class (by value), so compare by name and settings.
    assert type(policy).__name__ == "ExpertAutoscalingPolicy"
    assert policy.settings.as_kwargs() == policy_settings.as_kwargs()
    ticks = [(0.0, 7.0, 3.0)] + [(float(t), 0.0, 0.0) for t in range(1, 60)] + [(60.0, 1.0, 1.0)]
    decisions = serve_ticks(policy, config, clock, ticks, start=1)
    assert decisions[0] == 4  # queued on a saturated replica: at once
    assert decisions.index(1) == 1 + 30  # Serve adds no second delay on top of ours
    assert decisions.index(0) == 1 + 30 + 1  # idle since t=1, so the 10 s window passed
    assert decisions[-1] == 1  # Serve's cold start path wakes it


def test_serve_pickles_the_policy_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's controller unpickles the policy; it must not need the project importable."""
    config = AutoscalingConfig(**serve_autoscaling_config(PARK, max_replicas=2))
    blob = config.policy.get_serialized_policy_def()
    for name in [m for m in sys.modules if m == "cluster" or m.startswith("cluster.")]:
        monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def no_project(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cluster" or name.startswith("cluster."):
            raise ImportError(f"project import {name} attempted")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_project)
    policy_class = cloudpickle.loads(blob)
    policy = policy_class(**config.policy.policy_kwargs)
    ctx = context(config, now=0.0, replicas=1, total=6.0, queued=2.0)
    assert policy(ctx)[0] == 2

"""Autoscaling for expert deployments: waking a parked expert is cheap, a new replica is not.

The rule, applied every Serve control-loop tick to one expert deployment:

- **load** is Serve's `total_num_requests` (in flight + queued at handles, averaged over
  `look_back_period_s`); an expert needs `ceil(load / target_ongoing_requests)` replicas.
- **Scale up** when it needs more replicas than it has ordered: at once when requests
  queue at the handles while every ordered replica is running (all are saturated),
  otherwise after the need has lasted `upscale_delay_s`. Replicas still starting count
  as capacity, so a slow process start never triggers a second order.
- **Scale down** only when the load would fit in fewer replicas at `downscale_utilisation`
  of the target, continuously for `downscale_delay_s`; any tick that does not fit restarts
  the clock, and each step down restarts it again. The gap between the two thresholds is
  the hysteresis that stops a noisy load from flapping.
- **Idle**: `park` keeps one replica (its weights may leave HBM; a request wakes it by a
  switch), `zero` goes 1 -> 0 after `idle_s` without requests. A deployment at 0 replicas
  goes back to at least 1 on the first tick that sees a request (Serve's handle holds it).
- The answer always lies in Serve's capacity-adjusted `[min_replicas, max_replicas]`.

`decide` is that rule as a pure function of a `PolicyView`; `ExpertAutoscalingPolicy` (settings as
Serve `policy_kwargs`) and `expert_policy` (settings read from the standard config fields)
are the two Serve hooks. Serve pickles this module by value into its controller, so it
imports nothing from the project.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

IDLE_MODES = ("park", "zero")
POLICY_FUNCTION = "cluster.serve.autoscaling:ExpertAutoscalingPolicy"
# A window mean of the request count below this is "no requests" (float noise, not traffic).
IDLE_EPSILON = 1e-3
# Policy-state keys; prefixed so they never collide with Serve's own "__decision_*" keys.
UP_SINCE = "coe_up_since"
DOWN_SINCE = "coe_down_since"
IDLE_SINCE = "coe_idle_since"


class AutoscalingPolicyError(ValueError):
    """Settings, a context or a policy state the expert policy cannot use."""


def _finite_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AutoscalingPolicyError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise AutoscalingPolicyError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AutoscalingPolicyError(f"{name} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class PolicySettings:
    """Per-expert knobs; JSON-serialisable so they travel as Serve `policy_kwargs`."""

    idle_mode: str = "park"
    idle_s: float = 300.0
    upscale_delay_s: float = 1.0
    downscale_delay_s: float = 60.0
    downscale_utilisation: float = 0.75

    def __post_init__(self) -> None:
        if self.idle_mode not in IDLE_MODES:
            raise AutoscalingPolicyError(
                f"idle_mode must be one of {IDLE_MODES}, got {self.idle_mode!r}"
            )
        for name in ("idle_s", "upscale_delay_s", "downscale_delay_s"):
            _finite_non_negative(name, getattr(self, name))
        utilisation = _finite_non_negative("downscale_utilisation", self.downscale_utilisation)
        if not 0 < utilisation <= 1:
            raise AutoscalingPolicyError(
                f"downscale_utilisation must be in (0, 1], got {self.downscale_utilisation!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> PolicySettings:
        """Settings from a kwargs/YAML mapping; an unknown key is an error, not ignored."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AutoscalingPolicyError(
                f"unknown expert policy setting(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**values)  # type: ignore[arg-type]  # __post_init__ checks every type

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PolicyView:
    """What `decide` reads from Serve's AutoscalingContext, as plain numbers."""

    now_s: float
    current_replicas: int  # running now
    target_replicas: int  # ordered by the last decision (running + starting)
    total_requests: float  # in flight + queued, window aggregate
    queued_requests: float  # queued at handles, window aggregate
    target_ongoing_requests: float
    min_replicas: int  # capacity-adjusted
    max_replicas: int  # capacity-adjusted

    def __post_init__(self) -> None:
        _finite_non_negative("now_s", self.now_s)
        _count("current_replicas", self.current_replicas)
        _count("target_replicas", self.target_replicas)
        _finite_non_negative("total_requests", self.total_requests)
        _finite_non_negative("queued_requests", self.queued_requests)
        if _finite_non_negative("target_ongoing_requests", self.target_ongoing_requests) == 0:
            raise AutoscalingPolicyError("target_ongoing_requests must be > 0, got 0")
        _count("min_replicas", self.min_replicas)
        _count("max_replicas", self.max_replicas)
        if self.min_replicas > self.max_replicas:
            raise AutoscalingPolicyError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )


def view_from_context(ctx: Any) -> PolicyView:
    """Build the view from a `ray.serve.config.AutoscalingContext` (or anything shaped so)."""
    config = ctx.config
    if config is None:
        raise AutoscalingPolicyError(
            f"autoscaling context for {ctx.deployment_name!r} carries no config"
        )
    if config.target_ongoing_requests is None:
        raise AutoscalingPolicyError(
            f"deployment {ctx.deployment_name!r} has no target_ongoing_requests to scale on"
        )
    queued = ctx.total_queued_requests
    now = ctx.current_time
    return PolicyView(
        now_s=time.time() if now is None else float(now),
        current_replicas=ctx.current_num_replicas,
        target_replicas=ctx.target_num_replicas,
        total_requests=float(ctx.total_num_requests),
        queued_requests=0.0 if queued is None else float(queued),
        target_ongoing_requests=float(config.target_ongoing_requests),
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
    )


def _since(state: Mapping[str, Any], key: str) -> float | None:
    value = state.get(key)
    if value is None:
        return None
    return _finite_non_negative(f"policy_state[{key!r}]", value)


def _elapsed(now: float, since: float) -> float:
    return max(0.0, now - since)  # a clock that steps back never counts as time passed


def decide(
    view: PolicyView, state: Mapping[str, Any], settings: PolicySettings
) -> tuple[int, dict[str, Any]]:
    """Replicas to run next and the policy state to keep; `state` itself is not changed.

    Keys of `state` this policy does not own (Serve's own) are passed through.
    """
    up_since, down_since, idle_since = (
        _since(state, k) for k in (UP_SINCE, DOWN_SINCE, IDLE_SINCE)
    )
    now = view.now_s
    high = view.max_replicas
    low = min(high, max(view.min_replicas, 1 if settings.idle_mode == "park" else 0))
    ordered = view.target_replicas
    load = view.total_requests
    busy = load > IDLE_EPSILON
    idle_since = None if busy else (now if idle_since is None else idle_since)
    needed = math.ceil(load / view.target_ongoing_requests) if busy else 0
    fits = (
        math.ceil(load / (view.target_ongoing_requests * settings.downscale_utilisation))
        if busy
        else 0
    )

    decision = ordered
    if ordered == 0:
        # Nothing runs: wake at once; the handle is holding the request meanwhile.
        up_since = down_since = None
        decision = max(needed, 1) if busy else 0
    elif needed > ordered:
        down_since = None
        up_since = now if up_since is None else up_since
        saturated = view.queued_requests > IDLE_EPSILON and view.current_replicas >= ordered
        if saturated or _elapsed(now, up_since) >= settings.upscale_delay_s:
            decision, up_since = needed, None
    elif fits < ordered:
        up_since = None
        if ordered > 1:
            down_since = now if down_since is None else down_since
            if _elapsed(now, down_since) >= settings.downscale_delay_s:
                decision, down_since = max(fits, 1), None  # 1 -> 0 is the idle rule's
        elif settings.idle_mode == "zero" and idle_since is not None:
            down_since = None
            if _elapsed(now, idle_since) >= settings.idle_s:
                decision = 0
    else:
        up_since = down_since = None

    decision = max(low, min(high, decision))
    if busy and high >= 1:
        decision = max(decision, 1)
    new_state = {k: v for k, v in state.items() if k not in (UP_SINCE, DOWN_SINCE, IDLE_SINCE)}
    for key, value in ((UP_SINCE, up_since), (DOWN_SINCE, down_since), (IDLE_SINCE, idle_since)):
        if value is not None:
            new_state[key] = value
    return decision, new_state


class ExpertAutoscalingPolicy:
    """Serve hook taking per-expert settings as `policy_kwargs` (Serve builds it once).

    Pair it with zero Serve delays (see `serve_autoscaling_config`): Serve applies its own
    `upscale_delay_s` / `downscale_delay_s` on top of every custom policy's answer.
    """

    def __init__(self, **policy_kwargs: object) -> None:
        self.settings = PolicySettings.from_mapping(policy_kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return decide(view_from_context(ctx), dict(ctx.policy_state or {}), self.settings)


def settings_from_autoscaling_config(config: Any) -> PolicySettings:
    """Settings a plain-function hook can read from the standard `AutoscalingConfig` fields.

    `min_replicas == 0` means idle mode `zero`. The delays stay with Serve: it applies
    `upscale_delay_s`, `downscale_delay_s` and `downscale_to_zero_delay_s` to the policy's
    answer (resetting on any tick the answer equals the current target), so the policy's
    own clocks are zero here and only its thresholds and modes act.
    """
    mode = "zero" if config.min_replicas == 0 else "park"
    return PolicySettings(idle_mode=mode, idle_s=0.0, upscale_delay_s=0.0, downscale_delay_s=0.0)


def expert_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Serve hook as a plain function: settings come from `ctx.config` (see above)."""
    settings = settings_from_autoscaling_config(ctx.config)
    return decide(view_from_context(ctx), dict(ctx.policy_state or {}), settings)


def serve_autoscaling_config(
    settings: PolicySettings,
    *,
    max_replicas: int,
    target_ongoing_requests: float = 2.0,
    min_replicas: int | None = None,
    initial_replicas: int | None = None,
    look_back_period_s: float | None = None,
) -> dict[str, Any]:
    """The `autoscaling_config` dict that runs `ExpertAutoscalingPolicy` with `settings` on Serve.

    Serve's delays are zero because the policy keeps its own clocks; `min_replicas`
    defaults to 0 for `zero` and 1 for `park` and must agree with the mode when given.
    """
    expected_min = 0 if settings.idle_mode == "zero" else 1
    if min_replicas is None:
        min_replicas = expected_min
    elif settings.idle_mode == "zero" and min_replicas != 0:
        raise AutoscalingPolicyError(f"idle_mode 'zero' needs min_replicas 0, got {min_replicas}")
    elif settings.idle_mode == "park" and min_replicas < 1:
        raise AutoscalingPolicyError(
            f"idle_mode 'park' needs min_replicas >= 1, got {min_replicas}"
        )
    if _count("max_replicas", max_replicas) < max(min_replicas, 1):
        raise AutoscalingPolicyError(
            f"max_replicas ({max_replicas}) must be >= 1 and >= min_replicas ({min_replicas})"
        )
    config: dict[str, Any] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "policy": {"policy_function": POLICY_FUNCTION, "policy_kwargs": settings.as_kwargs()},
    }
    if initial_replicas is not None:
        config["initial_replicas"] = initial_replicas
    if look_back_period_s is not None:
        config["look_back_period_s"] = look_back_period_s
    return config


def simulate(
    loads: Sequence[float],
    settings: PolicySettings,
    tick_s: float,
    *,
    target_ongoing_requests: float = 2.0,
    max_replicas: int = 8,
    min_replicas: int | None = None,
    initial_replicas: int | None = None,
    max_ongoing_requests: int | None = None,
    start_ticks: int = 0,
) -> list[int]:
    """Ordered replicas after each tick of `decide` over in-flight load samples.

    A new replica serves `start_ticks` ticks after it is ordered (a process start). With
    `max_ongoing_requests`, load beyond what running replicas accept counts as queued.
    """
    if _finite_non_negative("tick_s", tick_s) == 0:
        raise AutoscalingPolicyError("tick_s must be > 0, got 0")
    _count("start_ticks", start_ticks)
    if (
        max_ongoing_requests is not None
        and _count("max_ongoing_requests", max_ongoing_requests) < 1
    ):
        raise AutoscalingPolicyError("max_ongoing_requests must be >= 1, got 0")
    low = (0 if settings.idle_mode == "zero" else 1) if min_replicas is None else min_replicas
    ordered = low if initial_replicas is None else initial_replicas
    ready_at = [0] * ordered  # tick at which each ordered replica serves
    state: dict[str, Any] = {}
    history: list[int] = []
    for tick, load in enumerate(loads):
        load = _finite_non_negative(f"loads[{tick}]", load)
        running = sum(1 for at in ready_at if at <= tick)
        accepted = math.inf if max_ongoing_requests is None else running * max_ongoing_requests
        view = PolicyView(
            now_s=tick * tick_s,
            current_replicas=running,
            target_replicas=ordered,
            total_requests=load,
            queued_requests=max(0.0, load - accepted),
            target_ongoing_requests=target_ongoing_requests,
            min_replicas=low,
            max_replicas=max_replicas,
        )
        decision, state = decide(view, state, settings)
        if decision > ordered:
            ready_at += [tick + start_ticks] * (decision - ordered)
        else:
            ready_at = sorted(ready_at)[:decision]  # drop starting replicas first
        ordered = decision
        history.append(ordered)
    return history

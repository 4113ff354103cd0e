"""The scale benchmark without Ray: arguments, the scenario it builds, sampling, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import scale, scale_report
from benchmarks.harness.client import Outcome
from benchmarks.harness.workload import open_loop
from benchmarks.scale_experts import ExpertSet
from benchmarks.scale_run import SystemRun
from benchmarks.systems import ZERO_AUTOSCALING, Scenario

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def checkpoint(path: Path, floats: int, template: bool = True) -> Path:
    """A checkpoint directory whose weights are `floats` float32 values."""
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(floats)}, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    (path / "tokenizer_config.json").write_text(json.dumps({}))
    if template:
        (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def experts(tmp_path: Path, count: int) -> tuple[Path, ...]:
    """A large real-looking expert without a chat template, then small ones."""
    big = checkpoint(tmp_path / "big", 1000, template=False)
    return (big, *(checkpoint(tmp_path / f"tiny-{i}", 100) for i in range(2, count + 1)))


def args(*extra: str) -> object:
    return scale.parse_args(["--json", "out.json", *extra])


def test_defaults_follow_the_spec() -> None:
    parsed = args()
    assert parsed.experts == 150 and parsed.max_tokens == 8
    assert parsed.systems == ["coe", "multiplex", "zero"]
    assert parsed.scaling == [20, 150]
    # K shares the arena's experts out among as many replicas as there are executors.
    assert parsed.k == 2 and parsed.executors == 2 and parsed.hbm_experts == 4
    assert args("--k", "3").k == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--systems", "coe,resident"], "unknown ['resident']"),
        (["--rate", "0"], "--rate must be > 0"),
        (["--zero-timeout", "-1"], "--zero-timeout must be > 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--scaling", "20,x"], "--scaling: expected N,N"),
        (["--scaling", "1,150"], "must be >= 2"),
        (["--gpu-share", "1.5"], "--gpu-share must be in [0, 1]"),
    ],
)
def test_bad_arguments_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        args(*argv)
    assert message in capsys.readouterr().err


def test_a_missing_prompt_file_stops_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone.jsonl"
    code = scale.main(["--prompts", str(missing), "--json", str(tmp_path / "s.json")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_each_system_gets_its_config_over_the_experts_and_arena_given(tmp_path: Path) -> None:
    dirs = experts(tmp_path, 5)
    built = ExpertSet(dirs, arena_bytes=4321, real=(dirs[0],), too_large=())
    scenario = scale.scenario_for(args("--hbm-experts", "2"), built, 5)
    sizes = scenario.expert_sizes()
    assert sizes["e1"] == 4000 and sizes["e2"] == 400
    assert scenario.hbm_budget_bytes == 4321
    assert scenario.checkpoints()["e3"] == dirs[2]
    assert scale.scenario_for(args("--hbm-experts", "2"), built, 3).checkpoints() == {
        "e1": dirs[0],
        "e2": dirs[1],
        "e3": dirs[2],
    }

    coe = scenario.system_config("coe")
    assert coe.tiers.enabled and coe.executors.enabled and coe.executors.replicas == 2
    assert coe.executor_experts() == list(coe.experts)
    # A checkpoint without a chat template (a base model) speaks through a transcript.
    assert [e.chat_format for e in coe.experts[:2]] == ["plain", "template"]

    zero = scenario.system_config("zero")
    assert not zero.tiers.enabled and not zero.executors.enabled
    for expert in zero.experts:
        assert expert.dedicated
        assert expert.autoscaling.model_dump(include=set(ZERO_AUTOSCALING)) == ZERO_AUTOSCALING
        assert expert.autoscaling.idle_s == 60.0

    multiplex = scenario.system_config("multiplex")
    assert not multiplex.tiers.enabled and not multiplex.executors.enabled
    assert scenario.max_models == 1 and scenario.multiplex_replicas == 2
    assert scenario.gpu_share == 0 and coe.tiers.device == "cpu"


def test_on_a_gpu_every_system_gets_its_share_and_coe_its_arena_there(tmp_path: Path) -> None:
    dirs = experts(tmp_path, 3)
    built = ExpertSet(dirs, arena_bytes=4321, real=(), too_large=())
    scenario = scale.scenario_for(args("--hbm-experts", "2", "--gpu-share", "0.3"), built, 3)
    coe = scenario.system_config("coe")
    assert coe.tiers.device == "cuda" and coe.executors.num_gpus == 0.3
    zero = scenario.system_config("zero")
    assert zero.tiers.device == "cpu"
    assert {e.ray_actor_options.num_gpus for e in zero.experts} == {0.3}
    # Ray gives the multiplex replicas the same share (build_multiplex_app's num_gpus).
    assert scenario.gpu_share == 0.3


def test_the_copies_scenario_of_compare_is_unchanged(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "source", 16, template=False)
    scenario = Scenario(experts=3, hbm_experts=1, checkpoint=source, copies_dir=tmp_path / "c")
    config = scenario.system_config("coe")
    assert not config.executors.enabled
    assert all(e.chat_format == "template" and not e.dedicated for e in config.experts)
    assert scenario.hbm_budget_bytes == int(64 * 1.5)
    with pytest.raises(ValueError, match="expert_dirs names 1 checkpoints for 3 experts"):
        Scenario(3, 1, source, tmp_path, expert_dirs=(source,))


def test_zero_gets_evenly_spaced_arrivals_at_their_planned_times() -> None:
    plan = open_loop(["p"], ["a", "b"], rate=5.0, duration_s=20.0, seed=1)
    sample = scale.zero_sample(plan, 5)
    assert len(sample) == 5
    planned = {p.index: p for p in plan.requests}
    assert all(planned[p.index] == p for p in sample.requests)
    gaps = [b.index - a.index for a, b in zip(sample.requests, sample.requests[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 1
    assert scale.zero_sample(plan, 10_000).requests == plan.requests


def outcome(index: int, ok: bool = True) -> Outcome:
    return Outcome(index, "e1", True, ok, 200, None, 0.0, 0.1, 0.2, 8, "e1", text="x")


def test_the_reference_sample_is_half_non_resident() -> None:
    outcomes = tuple(outcome(i, ok=i != 3) for i in range(12))
    flags = [i % 4 == 0 for i in range(12)]  # resident: 0, 4, 8
    picked = scale.reference_sample(SystemRun({}, outcomes, flags), 4)
    assert len(picked) == 4
    assert sum(flags[i] for i in picked) == 2 and 3 not in picked
    # Only three resident requests: the non-resident ones fill in.
    picked = scale.reference_sample(SystemRun({}, outcomes, flags), 8)
    assert sum(flags[i] for i in picked) == 3 and len(picked) == 8


def summary(overhead: float, p99: float, goodput: float, nonresident: float) -> dict:
    return {
        "switch_overhead_p50_s": overhead,
        "ttft_p50_s": 0.1,
        "ttft_p99_s": p99,
        "goodput_rps": goodput,
        "errors": 0,
        "switches": 3,
        "processes": 5,
        "peak_pss_outside_store_bytes": 2e9,
        "resident": {"ttft_p50_s": 0.05, "ttft_p99_s": 0.2},
        "nonresident": {"ttft_p50_s": nonresident, "ttft_p99_s": 0.4},
        "mismatches": 0,
    }


def test_ratios_and_goals_are_reported_met_or_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    systems = {
        "coe": {**summary(0.01, 0.5, 2.0, 0.06), "copy_bound_s": 0.003},
        "multiplex": summary(0.1, 1.0, 1.5, 0.4),
        "zero": summary(0.0, 20.0, 0.1, 10.0),
    }
    ratios = scale_report.ratios(systems)
    assert ratios == pytest.approx(
        {
            "coe_switch_overhead_over_multiplex": 0.1,
            "coe_ttft_p99_over_multiplex": 0.5,
            "coe_goodput_over_multiplex": 2.0 / 1.5,
            "coe_nonresident_ttft_p50_over_zero": 0.006,
        }
    )
    scaling = [
        {"experts": 20, "processes": 5, "peak_pss_outside_store_bytes": 2.0e9},
        {"experts": 150, "processes": 5, "peak_pss_outside_store_bytes": 2.5e9},
    ]
    goals = {g["goal"]: g for g in scale_report.goals(systems, ratios, scaling)}
    assert all(g["met"] for name, g in goals.items() if "10%" not in name)
    spread = goals["coe peak PSS outside the store within 10% across N"]
    assert spread["measured"] == pytest.approx(0.25) and spread["met"] is False
    copy = goals["coe switch overhead p50 <= 1.3 x copy bound + 20 ms (s)"]
    assert copy["target"] == pytest.approx(0.0239)
    # A baseline that did not run leaves its goals unmeasured, not failed.
    partial = scale_report.goals({"coe": systems["coe"]}, scale_report.ratios({}), [])
    assert {g["goal"]: g["met"] for g in partial}["coe TTFT p99 <= 1.0 x multiplex's"] is None

    results = {
        "systems": {**systems, "zero": {"failed": "RuntimeError: boom"}},
        "scaling": scaling,
        "ratios": ratios,
        "goals": list(goals.values()),
    }
    for name in systems:
        systems[name]["nonresident"]["ttft_p99_s"] = 0.5
    out = scale_report.plot_scale(
        results, {"coe": [0.05, 0.1], "multiplex": [0.1, 0.5], "zero": []}, tmp_path / "s.png"
    )
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    scale_report.print_table(results)
    printed = capsys.readouterr().out
    assert "zero       failed: RuntimeError: boom" in printed
    assert "(NOT met)" in printed and "scaling N=150: 5 processes, 2.50 GB" in printed


def test_real_checkpoints_are_used_only_where_they_fit_the_arena(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import scale_experts

    real = checkpoint(tmp_path / "real", 1000)  # 4000 bytes
    built: list[int] = []

    def tiny(output_dir: Path, seed: int, tokenizer_dir: Path) -> Path:
        assert tokenizer_dir == real
        built.append(seed)
        return output_dir if output_dir.is_dir() else checkpoint(output_dir, 100)  # 400 bytes

    monkeypatch.setattr(scale_experts, "real_checkpoints", lambda say: [real])
    monkeypatch.setattr(scale_experts, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(scale_experts, "build_tiny_expert", tiny)
    small_arena = scale_experts.build_experts(4, 2, 2, lambda _: None)
    assert small_arena.arena_bytes == 1000 and small_arena.too_large == (real,)
    assert small_arena.real == () and real not in small_arena.dirs
    assert [d.name for d in small_arena.dirs] == ["tiny-1", "tiny-2", "tiny-3", "tiny-4"]
    assert "larger than the arena" in str(small_arena.describe()["real_left_out"])

    large_arena = scale_experts.build_experts(4, 2, 12, lambda _: None)
    assert large_arena.arena_bytes == 5000 and large_arena.real == (real,)
    assert large_arena.dirs[0] == real and large_arena.dirs[1].name == "tiny-2"
    assert scale_experts.build_experts(4, 0, 12, lambda _: None).real == ()


def test_prompts_over_the_cluster_limit_are_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_only = tmp_path / "long.jsonl"
    long_only.write_text(json.dumps({"prompt": "x" * 9000}) + "\n")
    code = scale.main(["--prompts", str(long_only), "--json", str(tmp_path / "s.json")])
    assert code == 2
    assert "no prompt of at most 8000 characters" in capsys.readouterr().err


def test_residency_and_counters_are_read_over_every_device() -> None:
    from benchmarks.systems import device_totals, ready_residents

    residency = {
        "gpu0": {"residents": [{"expert": "a", "ready": True}, {"expert": "b", "ready": False}]},
        "gpu1": {"residents": [{"expert": "a", "ready": True}, {"expert": "c", "ready": True}]},
    }
    assert ready_residents(residency) == ["a", "c"]
    devices = {"gpu0": {"switches": 3.0, "hits": 1.0}, "gpu1": {"switches": 2.0, "hits": 5.0}}
    assert device_totals(devices, "switches", "hits") == {"switches": 5, "hits": 6}

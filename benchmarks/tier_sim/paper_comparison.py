"""The SN40L paper's switching comparison, reproduced from first principles.

Prabhakar et al., "SambaNova SN40L: Scaling the AI Memory Wall with Dataflow and
Composition of Experts", arXiv:2405.07518 (2024): Samba-CoE, 150 experts of 7B
parameters (bf16, 14 GB each), on one 8-socket SN40L node against one DGX-H100 and one
DGX-A100; switching 15x / 31x faster, overall 2.6-3.7x / 3.9-6.6x. Here the same seeded
trace replays on the three shipped profiles, and the report separates the per-switch
ratio (bandwidths alone) from the trace ratio (bandwidths x switch counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from benchmarks.tier_sim.profiles import GB, HardwareProfile, load_profile
from benchmarks.tier_sim.simulator import SimulationResult, hbm_capacity_experts, simulate
from benchmarks.tier_sim.trace import expert_names, zipf_trace

PAPER_PROFILES = ("sn40l", "dgx-h100", "dgx-a100")
# The paper's stated results against one SN40L node: switching speedup and overall speedup
# (range over batch size and output length).
PAPER_SWITCH_SPEEDUP = {"dgx-h100": 15.0, "dgx-a100": 31.0}
PAPER_OVERALL_SPEEDUP = {"dgx-h100": (2.6, 3.7), "dgx-a100": (3.9, 6.6)}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def paper_comparison(
    *,
    n_experts: int = 150,
    params_b: float = 7.0,
    bytes_per_param: float = 2.0,
    n_requests: int = 2000,
    zipf_s: float = 1.0,
    policy: str = "lru",
    seed: int = 0,
    rate_per_s: float = 1.0,
    output_tokens: Sequence[int] = (20, 200, 1000),
) -> dict[str, Any]:
    """150 x 7B bf16 experts on one SN40L node vs one DGX-H100 vs one DGX-A100, one trace.

    Reports the per-switch ratio (bandwidths alone) and the trace ratio (bandwidths times
    switch counts, which differ because the nodes' HBM holds different numbers of experts),
    and the overall ratio with roofline decode compute for a few output lengths. The DGX
    runs are repeated with each expert spread over all 8 GPUs ("all_links"), to show what
    the paper's one-link assumption is worth.
    """
    expert_bytes = int(params_b * 1e9 * bytes_per_param)
    catalog = expert_names(n_experts)
    trace = zipf_trace(n_requests, catalog, zipf_s, rate_per_s=rate_per_s, seed=seed)
    profiles = {name: load_profile(name) for name in PAPER_PROFILES}

    def run(profile: HardwareProfile, tokens: int = 0) -> SimulationResult:
        speed: Literal["roofline"] | None = "roofline" if tokens else None
        return simulate(
            trace,
            profile,
            policy,
            expert_bytes=expert_bytes,
            catalog=catalog,
            tokens_per_s=speed,
            default_output_tokens=tokens,
        )

    runs = {name: run(profile) for name, profile in profiles.items()}
    base = runs["sn40l"]
    per_switch = {name: expert_bytes / p.switch_bytes_per_s for name, p in profiles.items()}
    overall_base = {tokens: run(profiles["sn40l"], tokens).busy_seconds for tokens in output_tokens}
    summary: dict[str, Any] = {}
    for name in PAPER_PROFILES:
        profile = profiles[name]
        summary[name] = {
            "switch_gb_per_s": profile.switch_bytes_per_s / GB,
            "per_switch_s": per_switch[name],
            "hbm_capacity_experts": hbm_capacity_experts(profile, expert_bytes),
            "decode_tokens_per_s_roofline": profile.decode_read_bytes_per_s / expert_bytes,
            **runs[name].to_dict(per_expert=False),
        }
    ratios: dict[str, Any] = {}
    for name in PAPER_PROFILES[1:]:
        dgx = runs[name]
        wide = profiles[name].with_shards(profiles[name].devices)
        wide_run = run(wide)
        ratios[name] = {
            "per_switch": per_switch[name] / per_switch["sn40l"],
            "switch_count": _ratio(dgx.switches, base.switches),
            "trace_switch_seconds": _ratio(dgx.switch_seconds, base.switch_seconds),
            "paper_switch_speedup": PAPER_SWITCH_SPEEDUP[name],
            "overall_by_output_tokens": {
                str(tokens): _ratio(run(profiles[name], tokens).busy_seconds, overall_base[tokens])
                for tokens in output_tokens
            },
            "paper_overall_speedup_range": list(PAPER_OVERALL_SPEEDUP[name]),
            "all_links": {
                "expert_shards": wide.expert_shards,
                "switch_gb_per_s": wide.switch_bytes_per_s / GB,
                "hbm_capacity_experts": hbm_capacity_experts(wide, expert_bytes),
                "switches": wide_run.switches,
                "per_switch": (expert_bytes / wide.switch_bytes_per_s) / per_switch["sn40l"],
                "trace_switch_seconds": _ratio(wide_run.switch_seconds, base.switch_seconds),
            },
        }
    return {
        "setup": {
            "n_experts": n_experts,
            "params_b": params_b,
            "bytes_per_param": bytes_per_param,
            "expert_bytes": expert_bytes,
            "n_requests": n_requests,
            "zipf_s": zipf_s,
            "policy": policy,
            "seed": seed,
            "rate_per_s": rate_per_s,
            "output_tokens": list(output_tokens),
            "source": "arXiv:2405.07518 (SambaNova SN40L), Samba-CoE comparison",
        },
        "profiles": summary,
        "ratios": ratios,
        "explanation": _explain(profiles["sn40l"], summary, ratios, expert_bytes),
    }


def _explain(
    sn40l: HardwareProfile, summary: dict[str, Any], ratios: dict[str, Any], expert_bytes: int
) -> list[str]:
    sn = summary["sn40l"]
    link = sn40l.device.host_link_gb_per_s
    lines = [
        f"One switch moves {expert_bytes / GB:.0f} GB. SN40L: {sn['switch_gb_per_s']:.0f} GB/s "
        f"(min of {sn40l.expert_shards} sockets x {link:.0f} GB/s DDR and the node's "
        f"{sn40l.node_host_to_device_gb_per_s or 0:.0f} GB/s) = {sn['per_switch_s'] * 1e3:.1f} ms."
    ]
    for name, ratio in ratios.items():
        dgx = summary[name]
        lines.append(
            f"{name}: one host link at {dgx['switch_gb_per_s']:.0f} GB/s = "
            f"{dgx['per_switch_s'] * 1e3:.1f} ms per switch: per-switch ratio "
            f"{ratio['per_switch']:.2f}x (paper: {ratio['paper_switch_speedup']:.0f}x, i.e. "
            f"> 1 TB/s over {dgx['switch_gb_per_s']:.0f} GB/s)."
        )
        lines.append(
            f"{name}: HBM holds {dgx['hbm_capacity_experts']} experts (8 GPUs, whole experts "
            f"each) vs SN40L's {sn['hbm_capacity_experts']}, so on this trace it switches "
            f"{dgx['switches']} times vs {sn['switches']}: trace switch-time ratio "
            f"{ratio['trace_switch_seconds']:.2f}x."
        )
        overall = ", ".join(
            f"{tokens} tokens {value:.2f}x"
            for tokens, value in ratio["overall_by_output_tokens"].items()
        )
        low, high = ratio["paper_overall_speedup_range"]
        lines.append(
            f"{name}: overall (switch + roofline batch-1 decode, "
            f"{dgx['decode_tokens_per_s_roofline']:.0f} vs {sn['decode_tokens_per_s_roofline']:.0f}"
            f" tokens/s): {overall} (paper, measured: {low}-{high}x). The roofline is an upper"
            " bound neither machine reaches and decodes a DGX expert on one GPU, so this"
            " overall figure is indicative only."
        )
        wide = ratio["all_links"]
        lines.append(
            f"{name}: if each expert were spread over all 8 GPUs and loaded over 8 links at once "
            f"({wide['switch_gb_per_s']:.0f} GB/s), the per-switch ratio would be only "
            f"{wide['per_switch']:.2f}x: the paper's 15x/31x assumes one PCIe link per switch."
        )
        for warning in dgx["warnings"]:
            lines.append(f"{name}: {warning}.")
    return lines

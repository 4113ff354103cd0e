"""Load-test harness core: plan a workload, send it over HTTP, summarise, plot.

Nothing here starts a server; the systems under test are started elsewhere and
reached through a loopback base URL.

    from benchmarks.harness import (
        default_prompt_files, latency_series, load_prompts, open_loop, run_sync, summarise,
    )
    from benchmarks.harness.plots import plot_latency_cdf  # imported apart: matplotlib

    prompts = load_prompts(default_prompt_files(), limit=500)
    workload = open_loop(prompts, experts, rate=2.0, duration_s=60.0, zipf_s=1.0, seed=0)
    result = run_sync(workload, "http://127.0.0.1:8000", max_tokens=32, timeout_s=30.0)
    summary = summarise(result, slo_s=5.0)

Modules: `workload` (prompts, Zipf popularity, Poisson arrivals, `Workload`), `client`
(one timed request -> `Outcome`), `driver` (open and closed loops -> `RunResult`),
`stats` (percentiles, goodput, `summarise`), `plots` (latency CDF, replicas timeline),
`memory` (replica processes and their PSS, with and without Ray's object store).
"""

from benchmarks.harness.client import ErrorKind, Outcome, check_loopback, send
from benchmarks.harness.driver import RunResult, run, run_sync
from benchmarks.harness.stats import (
    StatsError,
    latency_series,
    meets_slo,
    percentile,
    ratio,
    summarise,
)
from benchmarks.harness.workload import (
    Planned,
    Workload,
    WorkloadError,
    closed_loop,
    default_prompt_files,
    load_prompts,
    open_loop,
    phased_arrivals,
    phased_open_loop,
    poisson_arrivals,
    sample_experts,
    zipf_weights,
)

__all__ = [
    "ErrorKind",
    "Outcome",
    "Planned",
    "RunResult",
    "StatsError",
    "Workload",
    "WorkloadError",
    "check_loopback",
    "closed_loop",
    "default_prompt_files",
    "latency_series",
    "load_prompts",
    "meets_slo",
    "open_loop",
    "percentile",
    "phased_arrivals",
    "phased_open_loop",
    "poisson_arrivals",
    "ratio",
    "run",
    "run_sync",
    "sample_experts",
    "send",
    "summarise",
    "zipf_weights",
]

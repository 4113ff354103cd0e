#!/usr/bin/env bash
# The device check, on one GPU machine from a clone. Sized for under 8 minutes on one
# H100 with the environment set up (not yet timed: no GPU has run it); DeepSpeed
# compiles its inference op on first use, which is most of the injection step:
#
#   benchmarks/device_check.sh [results.json [device_check options...]]
#       (default benchmarks/results/device_check.json; e.g. --prompts FILE... when the
#       scale benchmark's prompts are not at ../shared/data/prompts)
#
# 1. `make setup` (torch's CUDA build, pinned like the CPU one); with PYTHON=... set,
#    that interpreter's environment is used as it is (a machine without internet).
# 2. The CUDA unit tests: tests/gpu (CUDA IPC between two processes, the staged copy)
#    and the tier, engine and GPU-arena unit tests, now on a machine with CUDA.
# 3. python -m benchmarks.device_check: the switch against a pinned copy, kernel-
#    injected tokens against plain transformers, and the scale benchmark's coe and
#    multiplex systems on the GPU, into one JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/device_check.json}"
if [[ -z "${PYTHON:-}" ]]; then
    make setup
    PYTHON=.venv/bin/python
fi
"$PYTHON" -c "import torch, sys; torch.cuda.is_available() or sys.exit('device check: torch sees no GPU')"
echo "[device-check] CUDA unit tests"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu tests/unit/memory_tiers \
    tests/unit/cluster/serve/test_gpu_arena.py tests/unit/actors/engines
echo "[device-check] switch, kernel injection and the scale benchmark on CUDA"
"$PYTHON" -m benchmarks.device_check --device cuda --json "$out" "${@:2}"
echo "[device-check] wrote $out"

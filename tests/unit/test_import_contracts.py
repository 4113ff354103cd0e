"""The import contracts `make lint` runs hold, and each one catches the import it forbids.

Every check runs `lint-imports` on a copy of the packages, so a planted import never
touches the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGES = ("cluster", "actors", "router", "memory_tiers", "benchmarks")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

LAYERS = (
    "Layers: operator CLI > benchmarks > Serve wiring > ingress / setup > config > "
    "experts / router > tiers"
)
TIERS = "The memory tiers import nothing of the layers above them"
SERVING_ROUTER = "The serving router never imports its training and evaluation code"
LIGHT_INGRESS = "The ingress (HTTP, OpenAI API, gRPC methods) runs without Ray or torch"
ACYCLIC = "No import cycles between the modules or subpackages of any package"
CONTRACTS = (LAYERS, TIERS, SERVING_ROUTER, LIGHT_INGRESS, ACYCLIC)


def copy_packages(target: Path) -> Path:
    skip = shutil.ignore_patterns("__pycache__", "generated", "results", "*.png", "*.json")
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, target / package, ignore=skip)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH puts the copy ahead of the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def verdicts(output: str) -> dict[str, str]:
    """Contract name -> KEPT / BROKEN, read off the report's summary lines."""
    flat = " ".join(output.split())  # the report wraps long names over lines
    found: dict[str, str] = {}
    for name in CONTRACTS:
        for verdict in ("KEPT", "BROKEN"):
            if f"{name} {verdict}" in flat:
                found[name] = verdict
    return found


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_packages(tmp_path_factory.mktemp("house"))


def test_every_contract_holds_on_the_checkout(packages: Path) -> None:
    result = lint_imports(packages)
    assert result.returncode == 0, result.stdout + result.stderr
    assert verdicts(result.stdout) == dict.fromkeys(CONTRACTS, "KEPT")


PLANTED = [
    ("memory_tiers/arena.py", "import cluster.config", TIERS),
    ("memory_tiers/arena.py", "import cluster.config", LAYERS),
    ("router/two_step.py", "import router.training.optimiser", SERVING_ROUTER),
    ("cluster/ingress/auth.py", "import ray", LIGHT_INGRESS),
    ("actors/engines/base.py", "import cluster.serve.app", LAYERS),
    ("benchmarks/harness/stats.py", "import cluster.cli.main", LAYERS),
    ("memory_tiers/packing.py", "import memory_tiers.arena", ACYCLIC),
]


@pytest.mark.parametrize(("module", "line", "contract"), PLANTED)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = copy_packages(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # planted\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert verdicts(result.stdout)[contract] == "BROKEN", result.stdout

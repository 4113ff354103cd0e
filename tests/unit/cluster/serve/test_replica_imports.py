"""Each replica module imports only what its replica needs.

Serve pickles a replica class by reference, so every replica process imports the
module that defines its class. These tests import each replica module in a fresh
interpreter that already holds what a Serve replica process holds (Ray Serve's own
replica module, which brings fastapi, grpc and pydantic), and check which heavy
modules the replica module adds on top.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

# Prints the modules that importing argv[1] adds to what a Serve replica already holds.
PROBE = """
import importlib, json, sys
import ray.serve._private.replica
before = set(sys.modules)
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""

# A package listed here is forbidden together with its submodules.
INGRESS_FORBIDDEN = (
    "torch",
    "transformers",
    "scipy",
    "sklearn",
    "router.two_step",
    "router.classify.classifier",
    "memory_tiers.arena",
    "actors.weights.tiered_weights",
)
EXPERT_FORBIDDEN = (
    "fastapi",
    "grpc",
    "scipy",
    "sklearn",
    "router.two_step",
    "router.classify.classifier",
    "router.embed.embedder",
    "cluster.ingress.service",
    "cluster.ingress.openai_api",
    "cluster.ingress.http_api",
    "cluster.ingress.grpc.methods",
)


def modules_added_by(module: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"importing {module} failed:\n{done.stderr}"
    added: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return added


def forbidden_among(added: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name for name in added if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("cluster.serve.ingress_replica", INGRESS_FORBIDDEN),
        ("cluster.serve.handle_backend", INGRESS_FORBIDDEN),
        ("cluster.serve.expert_replica", EXPERT_FORBIDDEN),
        ("cluster.serve.executor_replica", EXPERT_FORBIDDEN),
    ],
)
def test_replica_module_imports_nothing_its_replica_does_not_need(
    module: str, forbidden: tuple[str, ...]
) -> None:
    added = modules_added_by(module)
    assert module in added  # the probe really imported it
    assert forbidden_among(added, forbidden) == []


def test_ingress_replica_leaves_torch_unimported() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import cluster.serve.ingress_replica, sys; print('torch' in sys.modules)",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_forbidden_among_matches_packages_and_their_submodules_only() -> None:
    added = ["scipy", "scipy.optimize", "scipyx", "router.two_step", "router.choose.mapping"]
    assert forbidden_among(added, ("scipy", "router.two_step")) == [
        "router.two_step",
        "scipy",
        "scipy.optimize",
    ]


def test_each_deployment_runs_the_class_of_its_lean_module() -> None:
    # Serve imports the defining module of the deployed class in the replica: it must
    # be the lean module checked above, not cluster.serve.deployments.
    from cluster.serve import deployments

    assert deployments.ExpertDeployment.func_or_class.__module__ == "cluster.serve.expert_replica"
    executor = deployments.ExecutorDeployment.func_or_class
    assert executor.__module__ == "cluster.serve.executor_replica"
    assert deployments.RouterDeployment.func_or_class.__module__ == "cluster.serve.router_replica"
    assert (
        deployments.PlacementDeployment.func_or_class.__module__
        == "cluster.serve.placement_replica"
    )
    ingress = deployments.IngressDeployment.func_or_class
    assert isinstance(ingress, type)
    assert deployments.IngressReplica in ingress.__mro__
    assert deployments.IngressReplica.__module__ == "cluster.serve.ingress_replica"

"""The serving path never imports router.training, not even inside a function.

Everything that fits, tunes or evaluates lives in router/training/; the router replica
and the config loader only need router/ outside it. Each serving module's source is
parsed and every import in it, at any depth, is checked, so a lazy import inside a
function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

ROUTER = PROJECT_ROOT / "router"
TRAINING = "router.training"


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, importer: str, is_package: bool = False) -> list[str]:
    """Every module an import statement in `source` names, relative ones made absolute.

    `from a import b` yields both "a" and "a.b": b may be a submodule.
    """
    package = importer if is_package else importer.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def is_training(module: str) -> bool:
    return module == TRAINING or module.startswith(TRAINING + ".")


def serving_modules() -> list[Path]:
    return sorted(
        path for path in ROUTER.rglob("*.py") if path.relative_to(ROUTER).parts[0] != "training"
    )


def test_the_serving_modules_are_found() -> None:
    names = {module_name(path) for path in serving_modules()}
    assert {"router.two_step", "router.classify.loading", "router.embed.embedder"} <= names
    assert not any(is_training(name) for name in names)


@pytest.mark.parametrize("path", serving_modules(), ids=module_name)
def test_serving_module_imports_nothing_from_training(path: Path) -> None:
    imports = imported_modules(
        path.read_text("utf-8"), module_name(path), is_package=path.name == "__init__.py"
    )
    assert sorted({name for name in imports if is_training(name)}) == []


def test_imports_inside_functions_and_relative_imports_are_seen() -> None:
    source = (
        "import numpy\n"
        "def fit():\n"
        "    from router.training.vote_fit import fit_vote_mixture\n"
        "class Lazy:\n"
        "    def load(self):\n"
        "        from ..training import optimiser\n"
        "        import router.training.cost_weight as cost\n"
        "from router import training\n"
    )
    imports = imported_modules(source, "router.classify.example")
    assert sorted({name for name in imports if is_training(name)}) == [
        "router.training",
        "router.training.cost_weight",
        "router.training.optimiser",
        "router.training.vote_fit",
        "router.training.vote_fit.fit_vote_mixture",
    ]

"""No import runs upward: each package of deis_jax imports only from its own layer and those
below it (every import statement, lazy ones inside functions included)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "deis_jax"

# Bottom up; packages on one line are one layer (they may not import each other).
LAYERS = (
    ("common",),
    ("sampling",),
    ("models",),
    ("fitting",),
    ("training", "evaluation"),
    ("experiments",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _package(module: str) -> str | None:
    """The layer package of a dotted ``deis_jax.<package>...`` name (None: not ours or the
    top-level ``deis_jax`` itself)."""
    parts = module.split(".")
    if parts[0] != "deis_jax" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in ``path``, relative ones resolved."""
    here = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if here[-1] == "__init__":
        here = here[:-1]
    else:
        here = here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if len(p.relative_to(PACKAGE).parts) > 1)


def test_every_package_has_a_layer():
    packages = {p.relative_to(PACKAGE).parts[0] for p in _modules()}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_upward(path):
    own = path.relative_to(PACKAGE).parts[0]
    upward = [
        f"line {line}: {module} ({_package(module)} is above {own})"
        for line, module in _imports(path)
        if _package(module) in RANK
        and _package(module) != own
        and RANK[_package(module)] >= RANK[own]
    ]
    assert not upward, "\n".join(upward)


MODES = sorted(p.name for p in (PACKAGE / "experiments").iterdir() if (p / "__init__.py").exists())


@pytest.mark.parametrize("mode", MODES)
def test_modes_never_import_each_other(mode):
    others = {f"deis_jax.experiments.{m}" for m in MODES if m != mode}
    crossing = [
        f"{path.relative_to(PACKAGE)} line {line}: {module}"
        for path in sorted((PACKAGE / "experiments" / mode).rglob("*.py"))
        for line, module in _imports(path)
        if any(module == o or module.startswith(o + ".") for o in others)
    ]
    assert not crossing, "\n".join(crossing)

"""The declared dependencies: requirements.txt and pyproject.toml list the same packages, and
every third-party module the package imports is declared."""

import ast
import os
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DISTRIBUTION = {
    "absl": "absl-py",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "tensorflow_datasets": "tensorflow-datasets",
    "orbax": "orbax-checkpoint",
    "yaml": "pyyaml",
}


def _requirements() -> list[str]:
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _declared() -> list[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def _name(requirement: str) -> str:
    for sep in "<>=!~ [":
        requirement = requirement.split(sep)[0]
    return requirement.lower().replace("_", "-")


def test_requirements_txt_equals_pyproject():
    assert _requirements() == _declared()


def test_every_imported_third_party_module_is_declared():
    declared = {_name(r) for r in _declared()}
    imported = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "deis_jax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {
        m for m in imported if m not in sys.stdlib_module_names and m not in ("deis_jax", "torch")
    }
    missing = sorted(m for m in third_party if _name(DISTRIBUTION.get(m, m)) not in declared)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_ci_runs_exactly_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_command = [line for line in f if line.startswith("python3 -m venv")][-1].strip()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert f"```bash\n{ci_command}\n```" in readme
    assert "ruff check" in ci_command and "pytest" in ci_command

"""Every third-party import of the project is declared in pyproject.toml.

A clean machine installs only what pyproject declares: the core dependencies, plus the extras asked
for (the README's test command installs `.[test]`). An import that works here only because a package
was installed by hand would fail there, so this test fails first. Source and benchmark files may
import what any extra declares (lazily, through `openmae.extras.require`); test files only what the
core and the `test` extra declare, or their tests would skip, or fail to collect, on a clean machine.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "tests", "benchmarks")
# Import names whose distribution is named otherwise, for packages not installed here.
ALIASES = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image"}


def requirement_names(requirements: list[str]) -> set[str]:
    """`"torch>=2.4"` -> `"torch"`, normalised (lower case, `_` as `-`)."""
    return {normalise(re.split(r"[\s<>=!~;\[(]", r.strip(), maxsplit=1)[0]) for r in requirements}


def normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def third_party_imports(path: Path) -> list[tuple[int, str]]:
    """`(line, top-level module)` of every absolute import in a file, stdlib and local ones left out."""
    tree = ast.parse(path.read_text(), str(path))
    local = {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif _is_importorskip(node):  # a test that skips on a clean machine tests nothing there
            modules = [node.args[0].value]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                found.append((node.lineno, top))
    return found


def _is_importorskip(node: ast.AST) -> bool:
    """`pytest.importorskip("name")` with a literal name."""
    return (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "importorskip"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
    )


def undeclared_imports(root: Path) -> list[str]:
    """One line per import of `root`'s src/, tests/ and benchmarks/ that pyproject does not declare."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    runtime = requirement_names(project.get("dependencies", []))
    extras = {
        name: requirement_names(reqs) for name, reqs in project.get("optional-dependencies", {}).items()
    }
    own = {p.name for p in (root / "src").iterdir() if p.is_dir()} if (root / "src").is_dir() else set()
    providers = metadata.packages_distributions()
    problems = []
    for folder in FOLDERS:
        allowed = (
            runtime | extras.get("test", set()) if folder == "tests" else runtime.union(*extras.values())
        )
        for path in sorted((root / folder).rglob("*.py")):
            for line, module in third_party_imports(path):
                if module in own:
                    continue
                distributions = {normalise(d) for d in providers.get(module, [])}
                distributions = distributions or {normalise(ALIASES.get(module, module))}
                if not distributions & allowed:
                    where = "the test extra" if folder == "tests" else "dependencies or an extra"
                    problems.append(f"{path.relative_to(root)}:{line}: imports {module!r}, not in {where}")
    return problems


def test_every_import_is_declared_in_pyproject():
    problems = undeclared_imports(ROOT)
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=1"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\nextra = ["pyyaml"]\n'
    )
    (tmp_path / "src" / "x").mkdir(parents=True)
    (tmp_path / "src" / "x" / "core.py").write_text("import numpy\nimport yaml\nfrom x import core\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_core.py").write_text(
        "import pytest\nimport yaml\nimport requests.adapters\npytest.importorskip('tomli_w')\n"
    )
    assert undeclared_imports(tmp_path) == [
        "tests/test_core.py:2: imports 'yaml', not in the test extra",  # only in another extra
        "tests/test_core.py:3: imports 'requests', not in the test extra",
        "tests/test_core.py:4: imports 'tomli_w', not in the test extra",
    ]

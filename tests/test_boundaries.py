"""The architecture's boundaries, read from the import statements of the tree.

- meterd imports from policyd only `policyd.shared`;
- `policyd.shared` imports nothing else from the project;
- the hot path (`policyd.authz`) never imports the operator tool (`policyd.admin`,
  `policyd.cli`), and nothing in policyd or meterd imports the local stack or the tests;
- the local stack (`compose`) never imports the tests;
- no two modules import each other, directly or round a longer circle;
- docs/architecture.md's code map names every package and only paths that exist.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGES: Final = ("policyd", "meterd", "compose")
PROJECT: Final = (*PACKAGES, "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES: Final = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every project module `name` imports (absolute or relative, at any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PROJECT:
                yield target


GRAPH: Final = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _within(target: str, *prefixes: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _offenders(sources: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    return [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _within(name, *sources)
        for target in targets
        if not _within(target, *allowed)
    ]


def test_the_tree_was_read() -> None:
    assert "policyd.authz.decision" in GRAPH
    assert "policyd.shared.keyspace" in GRAPH["policyd.authz.limits"]
    assert "meterd.settle" in GRAPH


def test_meterd_imports_only_policyd_shared() -> None:
    assert _offenders(("meterd",), ("meterd", "policyd.shared")) == []


def test_shared_imports_nothing_else_from_the_project() -> None:
    assert _offenders(("policyd.shared",), ("policyd.shared",)) == []


def test_the_hot_path_never_imports_the_operator_tool() -> None:
    assert _offenders(("policyd.authz",), ("policyd.authz", "policyd.shared")) == []


def test_the_operator_tool_stays_out_of_the_daemons() -> None:
    allowed = ("policyd.admin", "policyd.cli", "policyd.shared")
    assert _offenders(("policyd.admin",), allowed) == []
    # The CLI may read policyd's settings and key policy records; never meterd.
    assert _offenders(("policyd.cli",), (*allowed, "policyd.authz")) == []


def test_nothing_shipped_imports_the_tests_or_the_local_stack() -> None:
    assert _offenders(("policyd", "meterd"), ("policyd", "meterd")) == []
    assert _offenders(("compose",), ("compose", "policyd", "meterd")) == []


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in GRAPH.get(name, []):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in GRAPH:
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_circles() -> None:
    assert _cycle() is None


def _code_map() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Where the code is", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)`", section, flags=re.MULTILINE)


@pytest.mark.parametrize("path", _code_map())
def test_every_path_in_the_code_map_exists(path: str) -> None:
    assert (ROOT / path.rstrip("/")).exists(), f"docs/architecture.md names {path}"


def test_the_code_map_names_every_package() -> None:
    named = {entry.rstrip("/") for entry in _code_map()}
    packages = {
        str(init.parent.relative_to(ROOT))
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    assert packages - named == set()

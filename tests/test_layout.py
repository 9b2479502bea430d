"""The package's architecture, pinned: wings, layering and no import circles.

``polyv/`` (the API, its client and the simulator) and ``ledger/`` (Redis state) know nothing
of Celery; ``polyv/`` knows nothing of the ledger, the Celery core or the CLI; nothing but the
CLI imports the CLI; and no module reaches itself through its imports (lazy ones included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "polyv_sms"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at any depth of its code (lazy imports included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import module`` imports the module, not the package's names.
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)
    return found


GRAPH = {name: {dep for dep in _imports(name) if dep in MODULES} for name in MODULES}
EXTERNAL = {name: _imports(name) for name in MODULES}


def _in(wing: str, name: str) -> bool:
    return name == f"polyv_sms.{wing}" or name.startswith(f"polyv_sms.{wing}.")


def test_the_wings_exist() -> None:
    for wing in ("polyv", "polyv.simulator", "ledger", "cli"):
        assert f"polyv_sms.{wing}" in MODULES, wing
    flat = [n for n in MODULES if n.count(".") == 1 and n.split(".")[1].startswith("_")]
    assert flat == [], "private halves belong in a wing"


@pytest.mark.parametrize("wing", ["polyv", "ledger"])
def test_wings_do_not_import_celery(wing: str) -> None:
    for name, deps in EXTERNAL.items():
        if _in(wing, name):
            bad = {d for d in deps if d.split(".")[0] in {"celery", "kombu", "billiard"}}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_polyv_wing_stands_alone() -> None:
    allowed = {"polyv_sms.config", "polyv_sms.errors"}
    for name, deps in GRAPH.items():
        if _in("polyv", name):
            bad = {d for d in deps if not _in("polyv", d) and d not in allowed}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_ledger_wing_imports_no_core_but_config_and_errors() -> None:
    allowed = {"polyv_sms.config", "polyv_sms.errors", "polyv_sms.metrics"}
    for name, deps in GRAPH.items():
        if _in("ledger", name):
            bad = {
                d for d in deps if not (_in("ledger", d) or _in("polyv", d)) and d not in allowed
            }
            assert not bad, f"{name} imports {sorted(bad)}"


def test_only_the_cli_imports_the_cli() -> None:
    for name, deps in GRAPH.items():
        if not _in("cli", name):
            assert not {d for d in deps if _in("cli", d)}, name


def test_no_import_circles() -> None:
    """Depth-first search for a back edge; the package roots (``__init__``) re-export, so an
    edge into one of them counts only through what it really imports."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_public_names_keep_working() -> None:
    import polyv_sms
    import polyv_sms.client
    import polyv_sms.signing
    from polyv_sms.cli import main
    from polyv_sms.worker import app

    assert polyv_sms.signing.sign is polyv_sms.sign
    assert polyv_sms.client.PolyvClient is polyv_sms.PolyvClient
    assert callable(main)
    assert app.main == "polyv_sms"
    assert polyv_sms.send_sms.name == "polyv_sms.send_sms"

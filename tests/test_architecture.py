"""The layout's rules, checked on the code itself: no import cycle in wrpo_core (lazy imports count),
no Prefect in the core, the toy world behind one door, and no module too large to hold in one's head.

See docs/architecture.md for the map these rules keep true.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "wrpo_core"
MAX_LINES = 500

TOY_DOOR = {"wrpo_core.locations"}
"""The one production module that resolves `toy-world:` paths (through wrpo_core.toy.paths)."""
TOY_USERS = {"wrpo_core.demo", "wrpo_core.rewards"}
"""The toy demo itself, and the toy world's exact verifier (a reward-model kind)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(CORE.rglob("*.py"))}


def imported_names(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Every module named by an import anywhere in the file (inside functions too).

    `from package import name` names `package.name` when that is one of `modules`, else `package`.
    """
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = core_modules()
    return {
        name: {m for m in imported_names(path, set(modules)) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "wrpo_core" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("def f():\n    from . import other\n    import wrpo_core.x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imported_names(package / "mod.py", {"wrpo_core.pkg.other"}) == {
        "wrpo_core.pkg.other",
        "wrpo_core.x",
    }


def test_wrpo_core_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # every module was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_wrpo_core_never_imports_the_prefect_layer():
    offenders = {
        name: sorted(m for m in imported_names(path) if m.split(".")[0] in {"prefect", "flows", "tasks"})
        for name, path in core_modules().items()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_toy_world_has_one_door():
    offenders = {
        name: sorted(m for m in imported_names(path) if m.startswith("wrpo_core.toy"))
        for name, path in core_modules().items()
        if not name.startswith("wrpo_core.toy") and name not in TOY_DOOR | TOY_USERS
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_module_is_too_long_to_read():
    long = {
        name: lines
        for name, path in core_modules().items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"

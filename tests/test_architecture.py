"""The shape of the code: no import cycles, and dependencies point one way (plugins and suites build on
the host and its libraries; nothing outside plugins/ imports a method plugin, and plugins do not import
each other)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"qbench": "qbench", "plugins": "qbench.plugins", "kernels": "qbench.kernels", "suites": "qbench.suites"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """The qbench modules ``path`` imports, at module level or inside a function (a lazy import that
    closes a cycle is a cycle all the same)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in out if name in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_plugins_import_method_plugins():
    graph = _graph()
    offenders = sorted(f"{name} imports {dep}" for name, deps in graph.items() if not name.startswith("qbench.plugins")
                       for dep in deps if dep.startswith("qbench.plugins."))
    assert not offenders, offenders


def test_plugins_do_not_import_each_other():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("qbench.plugins."):
            assert not [d for d in deps if d.startswith("qbench.plugins.")], f"{name} imports {deps}"


def test_kernels_know_only_torch_triton_and_the_host_basics():
    graph = _graph()
    # records: compile_check's provenance line; paths: the cache folder (compiled CPU kernels)
    allowed = ("qbench.kernels", "qbench.params", "qbench.records", "qbench.paths")
    for name, deps in graph.items():
        if name.startswith("qbench.kernels."):
            assert all(d.startswith(allowed) for d in deps), f"{name} imports {deps}"

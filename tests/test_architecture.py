"""The code's shape: short functions, a planning layer without torch, no import cycles.

These read the source (AST) rather than run it, so they hold for every module, tested or not.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "remat"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    """Every module under src/remat: name -> (path, syntax tree)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


# ---- (a) short functions ------------------------------------------------------------------------------


def long_functions(limit: int) -> list[str]:
    """``path:line name (N lines)`` for every function or method longer than ``limit`` lines, counted
    from the ``def`` line (decorators excluded) to its last line, docstring included."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_is_longer_than_60_lines():
    offenders = long_functions(MAX_FUNCTION_LINES)
    assert not offenders, (
        f"{len(offenders)} functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(offenders)
    )


def test_the_length_check_counts_from_def_to_the_last_line():
    tree = ast.parse(textwrap.dedent("""
        @decorator
        def f(
            a,
        ):
            '''doc'''
            return a
    """))
    node = tree.body[0]
    assert node.end_lineno - node.lineno + 1 == 5


# ---- (b) the planning layer imports no torch ----------------------------------------------------------


def test_the_planning_layer_imports_without_torch():
    """Every module of remat.planning, and remat itself, imports with torch unimportable."""
    planning = sorted(name for name in sources() if name == "remat.planning" or name.startswith("remat.planning."))
    assert "remat.planning.solve" in planning
    code = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        for name in {[*planning, "remat.errors", "remat.units", "remat"]!r}:
            importlib.import_module(name)
        import remat
        p = remat.Profile.from_lists([1, 2, 3], [4, 5, 0], [1.0] * 3, [1.0] * 3)
        remat.solve(p, "90%")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC)
    assert r.returncode == 0, r.stderr


# ---- (c) no import cycles -----------------------------------------------------------------------------


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges ``module -> imported remat module`` for every import statement anywhere in a file (function
    bodies and ``if TYPE_CHECKING:`` blocks included), and the imports from the root package ``remat``
    made by library modules."""
    mods = sources()
    edges: dict[str, set[str]] = {name: set() for name in mods}
    from_root = []
    for name, (path, tree) in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node, name, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if target == "remat" and name != "remat":
                    from_root.append(f"{path.relative_to(SRC.parent)}:{node.lineno} imports from the root package")
                while target and target not in mods:  # import remat.x.y where y is not a module: remat.x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges, from_root


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as a path
    ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [cycle_in(edges, c) for c in components]


def cycle_in(edges: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through the component's first module, by breadth-first search back to it."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def test_no_import_cycles():
    edges, _ = import_graph()
    found = cycles(edges)
    assert not found, "import cycles among remat modules:\n" + "\n".join(" -> ".join(c) for c in found)


def test_library_modules_do_not_import_from_the_root_package():
    """``from remat import X`` inside src/remat (but in remat/__init__.py) could close a cycle through the
    root's lazy ``__getattr__``; import from the module that defines X."""
    _, from_root = import_graph()
    assert not from_root, "\n".join(from_root)


def test_the_cycle_finder_finds_and_prints_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_dir_of_remat_lists_every_public_name():
    """Names imported lazily (``remat.auto``, ``remat.measure``, ``remat.plan_of``) were missing from
    ``dir(remat)``, so a REPL's completion did not offer them."""
    import remat

    assert set(remat.__all__) <= set(dir(remat))
    assert all(hasattr(remat, name) for name in remat.__all__)

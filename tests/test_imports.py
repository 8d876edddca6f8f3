"""Imports flow one way: no import cycle among the modules of cat_jax/ and tasks/.

The graph is read from the source (an AST walk, nothing is imported): every `import` and
`from ... import` statement, at module level or inside a function, and every
`importlib.import_module` of a name the code spells out (a string literal, or a loop over a
module-level tuple of them, as tasks/__init__.py registers its modules). `from X import Y` where
X.Y is a module counts as importing X.Y; relative imports are resolved. A module that imports
X.Y does not count as importing the package X (Python runs X/__init__.py first, but X's own
imports of its submodules are then the usual edges, not a cycle).
"""

from __future__ import annotations

import ast
import collections
from collections.abc import Collection, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cat_jax", "tasks")


def module_files(root: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the packages (`pkg/__init__.py` is `pkg`)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _string_tuples(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level `NAME = ("a", "b", ...)` (a tuple or list of string literals) by name."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            values = node.value.elts
            if values and all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in values):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        out[target.id] = [v.value for v in values]
    return out


def _loop_values(tree: ast.Module) -> dict[str, list[str]]:
    """{loop variable: the strings it takes} for `for NAME in CONSTANT_TUPLE:` anywhere in the module."""
    constants = _string_tuples(tree)
    out: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and isinstance(node.iter, ast.Name)
            and node.iter.id in constants
        ):
            out.setdefault(node.target.id, []).extend(constants[node.iter.id])
    return out


def _is_import_module(call: ast.Call) -> bool:
    fn = call.func
    return (
        isinstance(fn, ast.Attribute)
        and fn.attr == "import_module"
        and isinstance(fn.value, ast.Name)
        and fn.value.id == "importlib"
    ) or (isinstance(fn, ast.Name) and fn.id == "import_module")


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(module: str, path: Path, modules: Collection[str]) -> set[str]:
    """The modules of `modules` that `module` (at `path`) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    loops = _loop_values(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
                if node.level
                else node.module or ""
            )
            out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.add(arg.value)
            elif isinstance(arg, ast.Name):
                out.update(loops.get(arg.id, []))
    return {name for name in out if name in modules and name != module}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the modules of ours it imports}."""
    files = module_files(root)
    return {module: imports_of(module, path, files) for module, path in files.items()}


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def _shortest_cycle(graph: Mapping[str, set[str]], start: str, within: set[str]) -> tuple[str, ...]:
    """The shortest chain start -> ... -> start inside `within` (breadth first, sorted neighbours)."""
    parent: dict[str, str] = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & within):
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return tuple(reversed(chain))
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise ValueError(f"{start} is on no cycle within {sorted(within)}")


def find_cycles(graph: Mapping[str, set[str]]) -> list[tuple[str, ...]]:
    """For every module on a cycle, the shortest cycle through it, each cycle once, written from its
    smallest module name: ("a", "b", "c") is a -> b -> c -> a."""
    cycles = set()
    for component in strongly_connected(graph):
        members = set(component)
        for module in component:
            chain = _shortest_cycle(graph, module, members)
            first = chain.index(min(chain))
            cycles.add(chain[first:] + chain[:first])
    return sorted(cycles)


def _chain(cycle: tuple[str, ...]) -> str:
    return " -> ".join((*cycle, cycle[0]))


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Top-level, function-level, relative, `from X import submodule` and import_module edges."""
    package = tmp_path / "cat_jax"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom cat_jax.sub import b\n",
        "sub/__init__.py": "from . import b\nfrom .c import thing\n",
        "sub/b.py": "def f():\n    from ..a import x\n    import cat_jax.d\n",
        "sub/c.py": "import importlib\nimportlib.import_module('cat_jax.a')\nfrom cat_jax import sub\n",
        "d.py": "NAMES = ('cat_jax.a', 'cat_jax.sub.c')\nimport importlib\n"
        "for _name in NAMES:\n    importlib.import_module(_name)\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("from cat_jax.sub import c as _c\n")
    graph = import_graph(tmp_path)
    assert graph == {
        "cat_jax": set(),
        "cat_jax.a": {"cat_jax.sub.b"},
        "cat_jax.sub": {"cat_jax.sub.b", "cat_jax.sub.c"},
        "cat_jax.sub.b": {"cat_jax.a", "cat_jax.d"},
        "cat_jax.sub.c": {"cat_jax.a", "cat_jax.sub"},
        "cat_jax.d": {"cat_jax.a", "cat_jax.sub.c"},
        "tasks": {"cat_jax.sub.c"},
    }
    # a -> sub.b -> a; d -> a -> sub.b -> d; the package and its submodule: sub -> sub.c -> sub.
    assert find_cycles(graph) == [
        ("cat_jax.a", "cat_jax.sub.b"),
        ("cat_jax.a", "cat_jax.sub.b", "cat_jax.d"),
        ("cat_jax.sub", "cat_jax.sub.c"),
    ]
    assert strongly_connected(graph) == [["cat_jax.a", "cat_jax.d", "cat_jax.sub", "cat_jax.sub.b", "cat_jax.sub.c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "Import cycles (break each: imports flow one way, see docs/ARCHITECTURE.md):\n  " + "\n  ".join(
        map(_chain, cycles)
    )


def _jobs_and_binaries() -> tuple[tuple[str, ...], dict[str, set[str]]]:
    from cat_jax.jobs import BINARIES

    return BINARIES, import_graph()


def test_binaries_pair_with_their_jobs_and_jobs_stand_alone():
    """Every entry point is `cat_jax/<name>.py` calling `cat_jax.jobs.<name>`; a job imports no
    other job and no binary; no library module imports a job or a binary."""
    binaries, graph = _jobs_and_binaries()
    jobs = {f"cat_jax.jobs.{name}" for name in binaries}
    entry = {f"cat_jax.{name}" for name in binaries}
    assert {m for m in graph if m.startswith("cat_jax.jobs.")} == jobs, "a job module without a binary"
    for name in binaries:
        assert f"cat_jax.jobs.{name}" in graph[f"cat_jax.{name}"], f"cat_jax/{name}.py must call its job"
        assert not graph[f"cat_jax.{name}"] & (jobs - {f"cat_jax.jobs.{name}"}), name
    for module, imported in graph.items():
        if module in entry or module == "cat_jax.jobs":
            continue
        assert not imported & entry, f"{module} imports a binary: {sorted(imported & entry)}"
        if module.startswith("cat_jax.jobs."):
            assert not imported & jobs, f"job {module} imports another job: {sorted(imported & jobs)}"
        else:
            assert not imported & jobs, f"library module {module} imports a job: {sorted(imported & jobs)}"


FAMILY_NAMES = ("T5Config", "Transformer", "T5Model", "DecoderConfig", "Decoder", "DecoderModel")


def test_only_models_names_a_family():
    """Outside cat_jax/models/, no module (nor a benchmark) imports a family's package or names its
    classes: everything reaches models through the contract (cat_jax.models)."""
    offenders = []
    files = [*module_files().items(), *((p.stem, p) for p in sorted((REPO / "benchmarks").glob("*.py")))]
    for module, path in files:
        if module.startswith("cat_jax.models"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Name):
                names = [node.id]
            for name in names:
                family = name.startswith(("cat_jax.models.t5", "cat_jax.models.decoder"))
                if family and "convert" not in name or name in FAMILY_NAMES:
                    offenders.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}: {name}")
    assert not offenders, "Reach models through cat_jax.models (the contract):\n  " + "\n  ".join(offenders)

"""The package's shape, checked statically: no import cycles, no overlong modules, no private
names borrowed from other modules.

Everything is read with ``ast`` from ``distvi/**/*.py``; nothing is imported, so a cycle that
happens to work at import time today (because the import sits inside a function) is still
reported.

Import edges
    Every ``import`` and ``from ... import`` statement counts, wherever it is: module level,
    inside functions and classes, under ``if`` (``TYPE_CHECKING`` included: the dependency is
    there even if it is not executed). Relative imports are resolved against the importing
    module's package. Imports of anything outside the package are ignored, and so are
    ``importlib.import_module`` strings.

    ``from P.x import name`` is an edge to ``P.x`` (the nearest module that exists, if ``x``
    is a name rather than a module).

The package re-export rule
    A package's ``__init__.py`` (``distvi`` itself, ``distvi.backends``) re-exports names
    from its submodules, and every submodule import runs it first. Counting that implicit
    run, or counting ``from distvi import adam`` as an edge to ``distvi``, would put every
    module in one circle with ``__init__``. So an import of a package resolves to the module
    that provides the name:

    - ``from distvi import data``, where ``distvi.data`` is a submodule: an edge to it;
    - ``from distvi import adam``, where ``distvi/__init__.py`` has
      ``from distvi.optimizers import adam`` (or a relative or ``*`` import that provides
      it): an edge to ``distvi.optimizers``, followed through nested packages'
      ``__init__`` re-exports as far as they go;
    - ``import distvi`` (or ``import distvi as dv``): an edge for each ``dv.<name>`` the
      module uses, resolved as above, or to ``distvi`` if it uses none;
    - a name the ``__init__`` defines itself (``__version__``) or that cannot be resolved:
      an edge to the package (``distvi``), which imports its submodules, so such an import
      in a submodule that ``__init__`` imports is reported as a cycle.

    ``__init__``'s own imports are ordinary edges (``distvi -> distvi.inference``).

Private names
    ``from distvi.x import _name`` / ``from .x import _name`` in a module other than
    ``distvi.x``, and the same reached through a module alias (``from distvi import store``
    then ``store._name``). Importing a private *module* (``from distvi._rng import Stream``,
    ``from distvi import _rng``) is fine: such a module exists to be shared inside the
    package. Dunder names (``__version__``) are not private.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distvi"
MAX_LINES = 450
LONG_ALLOWED = {"distvi/optimizers.py"}  # one table of update rules, read top to bottom


# ---------------------------------------------------------------------------- reading the package
def package_modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package directory ``pkg``."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Package:
    """The parsed modules of one package and the name resolution the rules above describe."""

    def __init__(self, pkg: Path) -> None:
        self.root = pkg.name
        self.base = pkg.parent
        self.files = package_modules(pkg)
        self.trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in self.files.items()}

    def rel(self, module: str) -> str:
        return self.files[module].relative_to(self.base).as_posix()

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    def inside(self, dotted: str | None) -> bool:
        return dotted is not None and (dotted == self.root or dotted.startswith(self.root + "."))

    def nearest(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a module of the package."""
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            name = ".".join(parts[:k])
            if name in self.files:
                return name
        return None

    def from_base(self, module: str, node: ast.ImportFrom) -> str | None:
        """The absolute module a ``from ... import`` reads from (relative ones resolved)."""
        if node.level == 0:
            return node.module
        here = module if self.is_package(module) else module.rpartition(".")[0]
        parts = here.split(".")
        if node.level - 1 > len(parts) - 1:
            return None  # beyond the top of the package
        parts = parts[:len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def _defines(self, module: str, name: str) -> bool:
        """``name`` is bound at the top of ``module`` other than by importing it."""
        for node in self.trees[module].body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name == name:
                    return True
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(t)):
                        return True
        return False

    def provider(self, module: str, name: str, seen: frozenset = frozenset()) -> str:
        """The module that provides ``name`` to ``from <module> import name``.

        For a plain module that is the module itself. For a package it is the submodule
        ``name``, else where its ``__init__`` re-exports ``name`` from (followed through
        nested packages), else the package.
        """
        if f"{module}.{name}" in self.files:
            return f"{module}.{name}"
        if not self.is_package(module) or (module, name) in seen:
            return module
        seen = seen | {(module, name)}
        stars = []
        for node in self.trees[module].body:
            if not isinstance(node, ast.ImportFrom):
                continue
            src = self.from_base(module, node)
            if not self.inside(src):
                continue
            for alias in node.names:
                if alias.name == "*":
                    stars.append(src)
                elif (alias.asname or alias.name) == name:
                    target = self.nearest(src)
                    return module if target is None else self.provider(target, alias.name, seen)
        if not self._defines(module, name):
            for src in stars:
                target = self.nearest(src)
                if target is not None and (self._defines(target, name)
                                           or f"{target}.{name}" in self.files):
                    return self.provider(target, name, seen)
        return module

    def attribute_chains(self, module: str):
        """``(line, root name, [attr, ...])`` for every outermost ``a.b.c`` of ``module``
        (``a.b.c`` once, not also ``a.b``)."""
        nodes = [n for n in ast.walk(self.trees[module]) if isinstance(n, ast.Attribute)]
        inner = {id(n.value) for n in nodes if isinstance(n.value, ast.Attribute)}
        for node in nodes:
            if id(node) in inner:
                continue
            attrs, cur = [], node
            while isinstance(cur, ast.Attribute):
                attrs.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                yield node.lineno, cur.id, attrs[::-1]


# ---------------------------------------------------------------------------- the import graph
def import_graph(pkg_dir: Path) -> dict[str, dict[str, list[str]]]:
    """``{importer: {imported: ["file:line", ...]}}`` under the rules of the module docstring."""
    pkg = _Package(pkg_dir)
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in pkg.files}

    for module, tree in pkg.trees.items():
        def edge(target: str | None, line: int) -> None:
            if target is not None and target != module:
                graph[module].setdefault(target, []).append(f"{pkg.rel(module)}:{line}")

        whole_packages: dict[str, tuple[str, int]] = {}  # bound name -> (package, line)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not pkg.inside(alias.name):
                        continue
                    target = pkg.nearest(alias.name)
                    if target is not None and target == alias.name and pkg.is_package(target):
                        bound = alias.asname or alias.name.split(".")[0]
                        if alias.asname or "." not in alias.name:
                            whole_packages[bound] = (target, node.lineno)
                            continue
                    edge(target, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                src = pkg.from_base(module, node)
                if not pkg.inside(src):
                    continue
                target = pkg.nearest(src)
                if target is None:
                    continue
                for alias in node.names:
                    if alias.name == "*" or target != src:
                        edge(target, node.lineno)
                    else:
                        edge(pkg.provider(target, alias.name), node.lineno)

        for bound, (package, line) in whole_packages.items():
            used = [(l, attrs) for l, root, attrs in pkg.attribute_chains(module)
                    if root == bound]
            if not used:
                edge(package, line)
            for l, attrs in used:
                target = package
                for attr in attrs:  # dv.data.ZarrSource: down to the deepest module
                    nxt = pkg.provider(target, attr)
                    if nxt == target:
                        break
                    target = nxt
                    if not pkg.is_package(target):
                        break
                edge(target, l)
    return graph


def _strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph, start: str, within: set[str]) -> list[str]:
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, {})):
            if w not in within:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return []


def _by_line(location: str) -> tuple[str, int]:
    path, _, line = location.rpartition(":")
    return path, int(line)


def _where(locations: list[str]) -> str:
    first = min(locations, key=_by_line)
    return first if len(locations) == 1 else f"{first} (+{len(locations) - 1} more)"


def import_cycles(pkg_dir: Path) -> list[str]:
    """One line per distinct shortest cycle through each module that is on one
    (``a -> b -> a``), each followed by where every hop is imported."""
    graph = import_graph(pkg_dir)
    found: dict[tuple[str, ...], list[str]] = {}
    for comp in _strongly_connected(graph):
        if len(comp) < 2:
            continue  # self-imports are not recorded as edges
        for start in comp:
            cycle = _shortest_cycle(graph, start, set(comp))
            k = cycle.index(min(cycle))
            found.setdefault(tuple(cycle[k:] + cycle[:k]), cycle)
    lines = []
    for key in sorted(found):
        ring = list(key) + [key[0]]
        hops = ", ".join(f"{a} -> {b} at {_where(graph[a][b])}" for a, b in zip(ring, ring[1:]))
        lines.append(f"{' -> '.join(ring)}    ({hops})")
    return lines


# ---------------------------------------------------------------------------- the other checks
def long_modules(pkg_dir: Path, limit: int = MAX_LINES, allowed: set[str] = LONG_ALLOWED) -> list[str]:
    """``"path: N lines"`` for every module over ``limit`` lines, except the ``allowed`` paths
    (relative to the package's parent directory)."""
    out = []
    for path in package_modules(pkg_dir).values():
        rel = path.relative_to(pkg_dir.parent).as_posix()
        n = len(path.read_text().splitlines())
        if n > limit and rel not in allowed:
            out.append(f"{rel}: {n} lines (limit {limit})")
    return out


def private_imports(pkg_dir: Path) -> list[str]:
    """``"file:line: what"`` for every private name one module takes from another."""
    pkg = _Package(pkg_dir)
    out = []
    for module, tree in pkg.trees.items():
        aliases: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if pkg.inside(alias.name):
                        name = alias.name if alias.asname else alias.name.split(".")[0]
                        target = pkg.nearest(name)
                        if target is not None:
                            aliases[alias.asname or name] = target
            elif isinstance(node, ast.ImportFrom):
                src = pkg.from_base(module, node)
                if not pkg.inside(src):
                    continue
                for alias in node.names:
                    if f"{src}.{alias.name}" in pkg.files:
                        aliases[alias.asname or alias.name] = f"{src}.{alias.name}"
                    elif _is_private(alias.name) and pkg.nearest(src) != module:
                        dots = "." * node.level + (node.module or "")
                        out.append(f"{pkg.rel(module)}:{node.lineno}: "
                                   f"from {dots} import {alias.name}")
        for line, root, attrs in pkg.attribute_chains(module):
            target = aliases.get(root)
            if target is None:
                continue
            for i, attr in enumerate(attrs):
                if f"{target}.{attr}" in pkg.files:
                    target = f"{target}.{attr}"
                    continue
                if _is_private(attr) and target != module:
                    out.append(f"{pkg.rel(module)}:{line}: "
                               f"{'.'.join([root, *attrs[:i + 1]])} ({target}.{attr})")
                break
    return sorted(set(out), key=lambda s: (_by_line(s.split(": ", 1)[0]), s))


# ---------------------------------------------------------------------------- distvi itself
def test_distvi_has_no_import_cycles():
    cycles = import_cycles(PACKAGE)
    assert not cycles, f"{len(cycles)} import cycle(s) in distvi:\n" + "\n".join(cycles)


def test_no_distvi_module_is_over_the_line_limit():
    long = long_modules(PACKAGE)
    assert not long, "modules over the limit:\n" + "\n".join(long)


def test_no_module_imports_a_private_name_of_another():
    found = private_imports(PACKAGE)
    assert not found, "private names imported across modules:\n" + "\n".join(found)


# The layers, lowest first: a module imports only from its own layer or the ones before it
# (ARCHITECTURE.md). Modules not named here are not checked.
LAYERS = [
    ("base", {"distvi._validate", "distvi._rng", "distvi._compile", "distvi._lean", "distvi._version",
              "distvi.errors", "distvi.redact"}),
    ("model and data", {"distvi.model", "distvi.model_terms", "distvi.model_errors",
                        "distvi.model_factory", "distvi.pymc_models", "distvi.data",
                        "distvi.local_terms", "distvi.local_data"}),
    ("math", {"distvi.optimizers", "distvi.families", "distvi.groups", "distvi.approximations",
              "distvi.results", "distvi.nodes", "distvi.fulldata", "distvi.operators",
              "distvi.stein", "distvi.diagnostics", "distvi.callbacks"}),
    ("driver", {"distvi.driver", "distvi.driver.state", "distvi.driver.step",
                "distvi.driver.loop", "distvi.driver.hooks", "distvi.driver.signals",
                "distvi.driver.profile", "distvi.driver.fused"}),
    ("backends", {"distvi.worker", "distvi.local_worker", "distvi.backends", "distvi.backends.base", "distvi.backends.local",
                  "distvi.backends.ray", "distvi.backends.ray_actor", "distvi.backends.ray_cluster",
                  "distvi.backends.ray_fleet", "distvi.backends.ray_paths", "distvi.backends.ray_tree",
                  "distvi.backends.start", "distvi.backends.anchored", "distvi.backends.ray_locals"}),
    ("sinks", {"distvi.store", "distvi.tracking"}),
    ("inference", {"distvi.shard_data", "distvi.rebuild", "distvi.recording",
                   "distvi.inference", "distvi.methods", "distvi.pathfinder",
                   "distvi.convergence", "distvi.phase_stats", "distvi.programs"}),
    ("runs", {"distvi.runs"}),
    ("front", {"distvi.config", "distvi.cli", "distvi"}),
]


def upward_imports(graph, layers) -> list[str]:
    rank = {m: i for i, (_, mods) in enumerate(layers) for m in mods}
    names = [name for name, _ in layers]
    bad = []
    for importer, targets in graph.items():
        for target, where in targets.items():
            if importer in rank and target in rank and rank[target] > rank[importer]:
                bad.append(f"{importer} ({names[rank[importer]]}) imports {target} "
                           f"({names[rank[target]]}) at {_where(where)}")
    return sorted(bad)


def test_imports_run_down_the_layers():
    graph = import_graph(PACKAGE)
    unplaced = sorted(set(graph) - {m for _, mods in LAYERS for m in mods})
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    bad = upward_imports(graph, LAYERS)
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_an_upward_import_is_named(tmp_path):
    pkg = write_package(tmp_path, {"toy/__init__.py": "", "toy/low.py": "from toy import high\n",
                                   "toy/high.py": "X = 1\n"})
    bad = upward_imports(import_graph(pkg), [("low", {"toy.low"}), ("high", {"toy.high"})])
    assert len(bad) == 1 and bad[0].startswith("toy.low (low) imports toy.high (high) at"), bad


def test_the_graph_reads_distvi_at_all():
    """Guards the checks above against passing because they read nothing."""
    graph = import_graph(PACKAGE)
    assert {"distvi", "distvi.inference", "distvi.backends.ray"} <= set(graph)
    assert "distvi.inference" in graph["distvi"]  # __init__'s own re-export imports
    assert "distvi._rng" in graph["distvi.worker"]


# ---------------------------------------------------------------------------- the checkers can fail
def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "toy"


def test_a_two_module_cycle_is_named_even_through_a_function_level_relative_import(tmp_path):
    pkg = write_package(tmp_path, {
        "toy/__init__.py": "from toy.a import f\n",
        "toy/a.py": "from toy.b import g\n\ndef f():\n    return g()\n",
        "toy/b.py": "def g():\n    from . import a\n    return a\n",
        "toy/c.py": "import toy.a\n",
    })
    cycles = import_cycles(pkg)
    assert len(cycles) == 1
    assert cycles[0].startswith("toy.a -> toy.b -> toy.a ")
    assert "toy/a.py:1" in cycles[0] and "toy/b.py:2" in cycles[0]


def test_imports_of_the_package_resolve_to_the_submodule_that_defines_the_name(tmp_path):
    pkg = write_package(tmp_path, {
        "toy/__init__.py": ("from toy.a import f\nfrom .sub import h\nfrom toy.star import *\n"
                            "from toy import c, d\nVERSION = 1\n"),
        "toy/a.py": "def f():\n    from toy import h, g\n    return h, g\n",
        "toy/sub/__init__.py": "from toy.sub.deep import h\n",
        "toy/sub/deep.py": "def h():\n    import toy as t\n    return t.star.g\n",
        "toy/star.py": "def g():\n    return 1\n",
        "toy/c.py": "from toy import f\n",
        "toy/d.py": "from toy import VERSION\n",
    })
    graph = import_graph(pkg)
    assert set(graph["toy.a"]) == {"toy.sub.deep", "toy.star"}  # via two re-export hops, and *
    assert set(graph["toy.sub.deep"]) == {"toy.star"}  # import toy as t; t.star.g
    assert set(graph["toy.c"]) == {"toy.a"}  # not toy: no false cycle through __init__
    assert set(graph["toy.d"]) == {"toy"}  # defined in __init__ itself: the package
    assert import_cycles(pkg) == ["toy -> toy.d -> toy    (toy -> toy.d at toy/__init__.py:4, "
                                  "toy.d -> toy at toy/d.py:1)"]


def test_a_long_module_is_named_with_its_line_count(tmp_path):
    pkg = write_package(tmp_path, {
        "toy/__init__.py": "",
        "toy/long.py": "x = 1\n" * 451,
        "toy/fits.py": "x = 1\n" * 450,
        "toy/table.py": "x = 1\n" * 900,
    })
    assert long_modules(pkg, 450, {"toy/table.py"}) == ["toy/long.py: 451 lines (limit 450)"]


def test_a_private_name_from_another_module_is_named_where_it_is_imported(tmp_path):
    pkg = write_package(tmp_path, {
        "toy/__init__.py": "from toy.a import f\n",
        "toy/_impl.py": "def helper():\n    pass\n",
        "toy/a.py": ("def f():\n    return _own()\n\ndef _own():\n    pass\n\n"
                     "def _hidden():\n    pass\n"),
        "toy/b.py": ("from toy.a import f, _hidden\nfrom toy._impl import helper\n"
                     "from toy import _impl, a\nfrom toy.a import __doc__\n\n"
                     "def g():\n    from .a import _own\n    return a._hidden, _impl.helper\n"),
        "toy/sub/__init__.py": "",
        "toy/sub/c.py": "import toy.a as ta\nfrom .. import a as same\n\nx = ta._own, same._own\n",
    })
    assert private_imports(pkg) == [
        "toy/b.py:1: from toy.a import _hidden",
        "toy/b.py:7: from .a import _own",
        "toy/b.py:8: a._hidden (toy.a._hidden)",
        "toy/sub/c.py:4: same._own (toy.a._own)",
        "toy/sub/c.py:4: ta._own (toy.a._own)",
    ]


def test_a_clean_package_passes_every_check(tmp_path):
    pkg = write_package(tmp_path, {
        "toy/__init__.py": "from toy.a import f\nfrom toy.b import g\n",
        "toy/_impl.py": "def helper():\n    pass\n",
        "toy/a.py": "from toy._impl import helper\n\ndef f():\n    return helper()\n",
        "toy/b.py": "from toy import f\nimport toy\n\ndef g():\n    return f, toy.a.f\n",
    })
    assert import_cycles(pkg) == []
    assert long_modules(pkg) == []
    assert private_imports(pkg) == []

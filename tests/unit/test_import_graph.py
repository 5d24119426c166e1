"""The house plan stays as drawn: no import cycle among our modules or among our packages, and every
package imports only the packages the plan lets it import.

Imports are read from the source with `ast`, not by importing anything, so a cycle is found even where
Python would tolerate it (a lazy import inside a function, an import under ``if TYPE_CHECKING:``).
Which imports count:

* every ``import x`` / ``from x import y`` anywhere in a file: at the top, inside functions and
  methods, under ``if``/``try``. A lazy import is still a dependency: it only moves the failure to
  run time.
* imports under ``if TYPE_CHECKING:`` count too. A type annotation that names ``Container`` makes the
  module know the container; the seam and the GPU layer must be usable (and readable) without the task
  package, so they must not name it even for the type checker. Hand them a Protocol they own instead.
* ``from pkg import name`` is an edge to ``pkg.name`` when that is one of our modules, else to ``pkg``.
* relative imports are resolved against the importing module's package.
* importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the ``__init__`` of ``a`` and ``a.b`` that
  Python also runs: those are bookkeeping, and counting them would make every package that re-exports
  its modules (``criu/__init__``) a cycle with each of them.
* generated protobuf modules (``*_pb2.py``, ``*_pb2_grpc.py``) are skipped: they import only protobuf
  and each other, and are regenerated, not edited.

Show the graph (for docs/design.md): ``python tests/unit/test_import_graph.py`` prints the package
graph with the number of importing modules per arrow; ``--modules`` prints every module edge, ``--dot``
the package graph for graphviz, ``--cycles`` the cycles this test fails on.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Our top-level packages (directories of the repository that setup.cfg installs).
TOP_LEVEL = ("ttrpc", "proto", "shim", "criu", "cuda_bindings", "kybernate", "fsutil", "tiers", "broker")

# The rooms of the plan. A module belongs to the longest of these that prefixes its name; the modules
# directly in shim/ (shim.wire) form the room "shim".
PACKAGES = (
    "shim.binary", "shim.task", "shim.runtime", "shim.checkpoint", "shim.gpu", "shim.cgroups", "shim.policy", "shim",
    "criu", "cuda_bindings", "ttrpc", "proto", "kybernate", "fsutil", "tiers", "broker",
)

# Which of our packages each package may import (the arrows of the plan). An arrow not listed here is a
# change of the plan: draw it here first, with the reason, then write the import.
MAY_IMPORT: dict[str, frozenset[str]] = {
    # Leaves: publishable or usable alone.
    "ttrpc": frozenset(),                 # stdlib only, a library of its own
    "fsutil": frozenset(),                # stdlib only: the installer loads it before anything is installed
    "proto": frozenset(),                 # generated code and anyutil; protobuf only
    "criu": frozenset({"fsutil", "ttrpc"}),   # CRIU, its config, images and logs; knows no shim, no CUDA
    #                                        (ttrpc.wire: the one bounds-checked protobuf reader, for pagemaps)
    "cuda_bindings": frozenset({"fsutil"}),   # the CUDA driver; knows no container
    # The shim's rooms, from the bottom up.
    "shim": frozenset({"ttrpc"}),         # shim.wire (over ttrpc.wire: the one protobuf reader), shim.bundle
    "shim.cgroups": frozenset({"fsutil", "proto"}),     # proto: containerd's cgroup metrics types
    "shim.policy": frozenset({"fsutil", "ttrpc"}),      # the node's config, audit refusals: the trust boundary
    "shim.runtime": frozenset({"shim", "shim.cgroups", "shim.policy", "fsutil", "ttrpc", "proto"}),
    # The seam: its interface and the plain CRIU path. The GPU layer is stacked on it (implements the
    # interface, wraps the CRIU path), so the arrow runs gpu -> checkpoint and never back; the task
    # package picks the layer once per container.
    "shim.checkpoint": frozenset({"shim", "shim.runtime", "shim.cgroups", "shim.policy", "criu", "fsutil", "ttrpc",
                                  "proto", "tiers"}),
    # The checkpoint tiers (RAM, disk, registry), their catalog and the node's worker: over the node's
    # policy (config, the store's layout) only, so that `kybernate store serve` runs without the shim
    # and the seam registers and locates checkpoints through it.
    "tiers": frozenset({"shim.policy", "fsutil"}),
    # The node broker (idle release, wake on demand, making room): a containerd client like the
    # operator's command, over the node's policy (config, audit refusals), the one GPU-request parser
    # (shim.runtime.gpu_request, stdlib only) and the cgroup readers of cuda_bindings; never the shim's
    # insides (pause and resume go through containerd's Tasks API).
    "broker": frozenset({"shim", "shim.policy", "shim.runtime", "cuda_bindings", "fsutil", "ttrpc", "proto"}),
    "shim.gpu": frozenset({"shim.checkpoint", "shim.runtime", "shim.cgroups", "shim.policy", "cuda_bindings", "criu",
                           "fsutil", "ttrpc", "proto"}),
    "shim.task": frozenset({"shim.checkpoint", "shim.gpu", "shim.runtime", "shim.cgroups", "shim.policy", "shim",
                            "criu", "cuda_bindings", "fsutil", "ttrpc", "proto"}),
    # the top: start/delete/daemon; the warm template preloads every room the daemon will use
    "shim.binary": frozenset({"shim.task", "shim.checkpoint", "shim.gpu", "shim.runtime", "shim.cgroups",
                              "shim.policy", "shim", "fsutil", "ttrpc", "proto"}),
    # The operator's command: a containerd client. It may read the shim's leaves (shim.wire) and the
    # node's policy (shim.policy: the node config and the checkpoint store's layout, so that
    # `kybernate checkpoint` writes where the shim's restore looks: one layout, no twin), never the
    # task service or the binary's lifecycle.
    "kybernate": frozenset({"proto", "criu", "cuda_bindings", "shim", "shim.policy", "fsutil", "tiers", "broker"}),
}

# Arrows that must never exist, whatever MAY_IMPORT says later (the reason is the message).
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("shim.gpu", "shim.task", "the GPU layer is handed what it needs; it never knows the container"),
    ("shim.checkpoint", "shim.task", "the seam is a layer: the container calls it, never the reverse"),
    ("kybernate", "shim.task", "the operator command talks to containerd, not to the shim's insides"),
    ("tiers", "shim.task", "the tier worker runs without the shim"),
    ("tiers", "shim.checkpoint", "the seam calls the tiers, never the reverse"),
    ("kybernate", "shim.binary", "the operator command talks to containerd, not to the shim's insides"),
    ("broker", "shim.task", "the broker pauses and resumes through containerd, never through the shim's insides"),
    ("broker", "shim.binary", "the broker is a node service, not part of the shim"),
    ("broker", "shim.gpu", "the broker reads the GPU through NVML; the shim's GPU layer is the shim's"),
    ("broker", "shim.checkpoint", "the broker pauses and resumes, it never checkpoints"),
    ("broker", "kybernate", "the operator command calls the broker, never the reverse"),
)
for _low in ("ttrpc", "criu", "cuda_bindings", "fsutil", "proto"):
    for _high in ("shim", "shim.binary", "shim.task", "shim.runtime", "shim.checkpoint", "shim.gpu",
                  "shim.cgroups", "shim.policy", "kybernate", "broker"):
        FORBIDDEN += ((_low, _high, f"{_low} is below the shim and the operator command"),)


@dataclass(frozen=True)
class Import:
    source: str      # importing module
    target: str      # imported module (ours)
    path: str        # file, relative to the repository
    line: int
    type_checking: bool


def _is_generated(path: Path) -> bool:
    return path.name.endswith(("_pb2.py", "_pb2_grpc.py"))


def module_files() -> dict[str, Path]:
    """module name -> file, for every .py file of our packages (generated protobuf modules left out)."""
    out: dict[str, Path] = {}
    for top in TOP_LEVEL:
        root = REPO / top
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            if _is_generated(path) or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _package_of_module(name: str, path: Path) -> str:
    """The package a module's relative imports are resolved against."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve_relative(name: str, path: Path, level: int, module: str | None) -> str:
    base = _package_of_module(name, path).split(".")
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(tree: ast.AST):
    """(node, under `if TYPE_CHECKING:`) for every import node, at any depth."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, tc = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, tc
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, tc) for child in node.orelse)
            continue
        stack.extend((child, tc) for child in ast.iter_child_nodes(node))


def _ours(target: str, modules: dict[str, Path]) -> str | None:
    """The most specific module of ours that `target` names (a.b.c -> a.b.c, else a.b, else a)."""
    parts = target.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports(modules: dict[str, Path] | None = None, root: Path = REPO) -> list[Import]:
    """Every import of one of our modules by another, with where it is written."""
    modules = module_files() if modules is None else modules
    out: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = str(path.relative_to(root))
        for node, tc in _walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = (_resolve_relative(name, path, node.level, node.module) if node.level
                        else node.module or "")
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if sub in modules else base)
            for mod in dict.fromkeys(_ours(t, modules) for t in targets):   # once per statement
                if mod is not None and mod != name:
                    out.append(Import(name, mod, rel, node.lineno, tc))
    return sorted(out, key=lambda e: (e.path, e.line, e.target))


def package_of(module: str) -> str:
    for pkg in sorted(PACKAGES, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    raise AssertionError(f"module {module} is in no package of the plan: add its room to PACKAGES")


# ---- cycles -------------------------------------------------------------------------------------
def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with more than one node (a cycle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle inside a component, as a path that ends where it starts."""
    members = set(component)
    best: list[str] | None = None
    for start in component:
        parents: dict[str, str] = {}     # breadth-first from start, staying inside the component
        frontier, closing = [start], None
        while frontier and closing is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, ())):
                    if child == start:
                        closing = node
                        break
                    if child in members and child not in parents:
                        parents[child] = node
                        nxt.append(child)
                if closing is not None:
                    break
            frontier = nxt
        if closing is None:
            continue
        path = [closing]
        while path[-1] != start:
            path.append(parents[path[-1]])
        path = list(reversed(path)) + [start]
        if best is None or len(path) < len(best):
            best = path
    assert best is not None, component
    return best


def module_graph(edges: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    return graph


def package_edges(edges: list[Import]) -> dict[tuple[str, str], list[Import]]:
    out: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for e in edges:
        a, b = package_of(e.source), package_of(e.target)
        if a != b:
            out[(a, b)].append(e)
    return out


def _where(e: Import) -> str:
    return f"{e.path}:{e.line}" + (" (TYPE_CHECKING)" if e.type_checking else "")


def _describe(graph: dict[str, set[str]], component: list[str], witness) -> str:
    """A shortest cycle of the component with the imports that make each arrow, then the component's
    other arrows: breaking the shortest cycle alone may leave a longer one."""
    cycle = shortest_cycle(graph, component)
    lines = [" -> ".join(cycle)]
    shown = set(zip(cycle, cycle[1:]))
    for a, b in zip(cycle, cycle[1:]):
        lines.append(f"    {a} -> {b}: {witness(a, b)}")
    rest = sorted((a, b) for a in component for b in graph.get(a, ()) if b in component and (a, b) not in shown)
    if rest:
        lines.append(f"  and inside the same circle ({', '.join(component)}):")
        lines += [f"    {a} -> {b}: {witness(a, b)}" for a, b in rest]
    return "\n".join(lines)


def describe_module_cycles(edges: list[Import]) -> list[str]:
    graph = module_graph(edges)
    by_pair: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for e in edges:
        by_pair[(e.source, e.target)].append(e)
    return [_describe(graph, c, lambda a, b: ", ".join(_where(e) for e in by_pair[(a, b)]))
            for c in strongly_connected(graph)]


def describe_package_cycles(edges: list[Import]) -> list[str]:
    pkg = package_edges(edges)
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in pkg:
        graph[a].add(b)
    return [_describe(graph, c, lambda a, b: ", ".join(f"{e.source} -> {e.target} ({_where(e)})"
                                                      for e in pkg[(a, b)]))
            for c in strongly_connected(graph)]


# ---- the tests ----------------------------------------------------------------------------------
def test_the_walk_sees_lazy_relative_and_type_checking_imports(tmp_path):
    """The reader itself: imports inside functions, under TYPE_CHECKING, relative ones and
    `from pkg import module` all become edges to the right module."""
    src = {
        "p/__init__.py": "from .a import thing\n",
        "p/a.py": ("from typing import TYPE_CHECKING\nimport p.b\nif TYPE_CHECKING:\n    from p.sub import c\n"
                   "thing = 1\n"),
        "p/b.py": "def f():\n    from . import a\n    from .sub.c import x\n",
        "p/sub/__init__.py": "",
        "p/sub/c.py": "try:\n    from ..b import f\nexcept ImportError:\n    pass\nimport os, json\n",
    }
    for rel, text in src.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = {}
    for rel in src:
        parts = rel[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = tmp_path / rel
    edges = imports(modules, root=tmp_path)
    found = {(e.source, e.target, e.type_checking) for e in edges}
    assert found == {("p", "p.a", False), ("p.a", "p.b", False), ("p.a", "p.sub.c", True),
                     ("p.b", "p.a", False), ("p.b", "p.sub.c", False), ("p.sub.c", "p.b", False)}
    graph = module_graph(edges)
    assert strongly_connected(graph) == [["p.a", "p.b", "p.sub.c"]]
    assert shortest_cycle(graph, ["p.a", "p.b", "p.sub.c"]) in (["p.a", "p.b", "p.a"], ["p.b", "p.a", "p.b"])


def test_every_module_is_in_a_room_of_the_plan():
    modules = module_files()
    assert "shim.task.container" in modules and "ttrpc.wire" in modules   # the walk found our code
    for name in modules:
        package_of(name)


def test_no_cycle_among_modules():
    cycles = describe_module_cycles(imports())
    assert not cycles, "import cycles among modules:\n" + "\n".join(cycles)


def test_no_cycle_among_packages():
    cycles = describe_package_cycles(imports())
    assert not cycles, "import cycles among packages:\n" + "\n".join(cycles)


def test_packages_import_only_what_the_plan_allows():
    problems = []
    for (a, b), edges in sorted(package_edges(imports()).items()):
        where = ", ".join(f"{e.source} -> {e.target} ({_where(e)})" for e in edges)
        for low, high, why in FORBIDDEN:
            if (a, b) == (low, high):
                problems.append(f"{a} must not import {b} ({why}): {where}")
                break
        else:
            if b not in MAY_IMPORT[a]:
                problems.append(f"{a} imports {b}, an arrow the plan does not have (MAY_IMPORT): {where}")
    assert not problems, "\n".join(problems)


# ---- printing the graph -------------------------------------------------------------------------
def format_packages(edges: list[Import]) -> str:
    pkg = package_edges(edges)
    lines = []
    for a in sorted({p for pair in pkg for p in pair} | set(PACKAGES)):
        outs = sorted((b, len({e.source for e in es})) for (x, b), es in pkg.items() if x == a)
        lines.append(f"{a:16} -> " + (", ".join(f"{b} ({n})" for b, n in outs) or "(nothing of ours)"))
    return "\n".join(lines)


def format_dot(edges: list[Import]) -> str:
    pkg = package_edges(edges)
    lines = ["digraph packages {", "  rankdir=TB; node [shape=box];"]
    for (a, b), es in sorted(pkg.items()):
        style = ' [style=dashed]' if all(e.type_checking for e in es) else ""
        lines.append(f'  "{a}" -> "{b}"{style};')
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    edges = imports()
    if "--modules" in argv:
        for e in sorted(edges, key=lambda e: (e.source, e.target, e.line)):
            print(f"{e.source} -> {e.target}  {_where(e)}")
    elif "--dot" in argv:
        print(format_dot(edges))
    elif "--cycles" in argv:
        found = describe_module_cycles(edges) + describe_package_cycles(edges)
        print("\n".join(found) if found else "no cycles")
        return 1 if found else 0
    else:
        print(format_packages(edges))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

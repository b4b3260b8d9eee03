"""The project's layering, checked from the source with ``ast`` (nothing is imported).

Every ``.py`` file under ``mmalign/``, ``data_pipelines/`` and ``models/`` is parsed and every
import in it is collected, wherever it sits: at module level, inside a function or method, under
``if TYPE_CHECKING:``, or as ``importlib.import_module("<literal>")``. The imports form a graph
(:class:`ImportGraph`) that the rules below are checked against:

* :data:`RULES`: "modules under ``source`` never import modules under ``forbidden``" (a
  :class:`Rule`; a module importing itself or its own package is never a violation). To add one,
  append a ``Rule(...)`` to :data:`RULES`; e.g. no method importing another method::

      Rule("no method imports another method", source="mmalign.methods",
           forbidden=("mmalign.methods",), allowed=("mmalign.methods.base",))

* :data:`ACYCLIC`: packages whose modules must not import each other in a circle (module-level
  and function-level imports together; a function-level import breaks the circle at import time
  only, the modules still depend on each other). A failure prints each cycle with the file:line
  of every edge on it. A cycle that cannot be fixed at once goes in :data:`KNOWN_CYCLES`, with
  why: it then has its own ``xfail(strict=True)`` case, which fails once the cycle is gone.

Import resolution: ``import a.b.c`` is an edge to ``a.b.c``; ``from a.b import c`` to ``a.b.c``
when that is a module of the project, else to ``a.b`` (``c`` is a name in it); relative imports are
resolved against the importing module's package. Parent packages that Python imports on the way
(``a``, ``a.b``) are not edges: every module would otherwise depend on its package's
``__init__``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the folders whose files are parsed (each a package at the repository root)
PACKAGES = ("mmalign", "data_pipelines", "models")


# ---------------------------------------------------------------------------------------------
# the graph


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``src`` imports ``dst`` at ``path:line``; ``where`` is
    ``"module"`` (module level), ``"function"`` (inside a def or class body), ``"type-checking"``
    (under ``if TYPE_CHECKING:``) or ``"dynamic"`` (``importlib.import_module`` of a literal)."""

    src: str
    dst: str
    path: str
    line: int
    where: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.src} imports {self.dst} ({self.where})"


def under(module: str, prefix: str) -> bool:
    """``module`` is ``prefix`` or inside it (``a.b`` is under ``a``, ``ab`` is not)."""
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Every import of one file, with where it sits."""

    def __init__(self, module: str, is_package: bool):
        self.module = module
        # the package relative imports resolve against
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, tuple[str, ...], int, str]] = []  # (base, names, line, where)
        self._where = ["module"]

    def _nested(self, node: ast.AST, where: str) -> None:
        self._where.append(where if self._where[-1] == "module" else self._where[-1])
        self.generic_visit(node)
        self._where.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, "function")

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]
    visit_ClassDef = visit_FunctionDef  # type: ignore[assignment]
    visit_Lambda = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._where.append("type-checking")
            for child in node.body:
                self.visit(child)
            self._where.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, (), node.lineno, self._where[-1]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            pkg = self.package.split(".") if self.package else []
            if node.level - 1 > len(pkg):
                raise ValueError(f"{self.module}:{node.lineno}: relative import beyond the top package")
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, *([base] if base else [])])
        self.found.append((base, tuple(a.name for a in node.names if a.name != "*"), node.lineno, self._where[-1]))

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if (name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            self.found.append((node.args[0].value, (), node.lineno, "dynamic"))
        self.generic_visit(node)


@dataclass(repr=False)
class ImportGraph:
    """Modules (dotted name -> file) and every import edge among and out of them."""

    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)

    def __repr__(self) -> str:  # short, for pytest's failure reports
        return f"ImportGraph({len(self.modules)} modules, {len(self.imports)} imports)"

    @classmethod
    def build(cls, packages: Sequence[str] = PACKAGES, root: Path = ROOT) -> ImportGraph:
        g = cls()
        files = sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))
        g.modules = {module_name(p, root): p for p in files}
        for path in files:
            mod = module_name(path, root)
            c = _Collector(mod, path.name == "__init__.py")
            c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            rel = str(path.relative_to(root))
            for base, names, line, where in c.found:
                targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in g.modules]
                if not targets or len(targets) < len(names):
                    targets.append(base)  # ``from base import name``: name lives in base
                for dst in dict.fromkeys(targets):
                    g.imports.append(Import(mod, dst, rel, line, where))
        return g

    def edges(self, source: str | None = None, target: str | None = None) -> list[Import]:
        """Imports by modules under ``source`` of modules under ``target`` (None: any)."""
        return [i for i in self.imports if (source is None or under(i.src, source))
                and (target is None or under(i.dst, target))]

    def adjacency(self, within: str) -> dict[str, dict[str, Import]]:
        """Module -> imported module -> the first import making that edge, both under ``within``."""
        adj: dict[str, dict[str, Import]] = defaultdict(dict)
        for i in self.edges(within, within):
            if i.dst in self.modules and i.dst != i.src:
                adj[i.src].setdefault(i.dst, i)
        return adj

    def components(self, within: str) -> list[frozenset[str]]:
        """The strongly connected components of more than one module under ``within`` (Tarjan),
        sorted by their first module's name: each is one or more import cycles."""
        adj = self.adjacency(within)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        comps: list[list[str]] = []

        def strongconnect(v: str) -> None:  # recursion depth = module count, a few hundred at most
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(adj.get(v, {})):
                if w not in index:
                    strongconnect(w)
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
                if len(comp) > 1:
                    comps.append(sorted(comp))

        for v in sorted(m for m in self.modules if under(m, within)):
            if v not in index:
                strongconnect(v)
        return [frozenset(c) for c in sorted(comps)]

    def cycles(self, within: str) -> list[list[Import]]:
        """One cycle per component of :meth:`components` (in that order), as its edges: the
        shortest from the component's first module by name back to it."""
        adj = self.adjacency(within)
        return [self._cycle_through(min(c), set(c), adj) for c in self.components(within)]

    @staticmethod
    def _cycle_through(start: str, comp: set[str], adj: dict[str, dict[str, Import]]) -> list[Import]:
        """The shortest cycle from ``start`` back to it inside ``comp`` (breadth first)."""
        prev: dict[str, Import] = {}
        frontier = [start]
        while frontier:
            nxt = []
            for v in frontier:
                for w, imp in sorted(adj.get(v, {}).items()):
                    if w not in comp or w in prev:
                        continue
                    prev[w] = imp
                    if w == start:
                        path = [imp]
                        while path[0].src != start:
                            path.insert(0, prev[path[0].src])
                        return path
                    nxt.append(w)
            frontier = nxt
        raise AssertionError(f"{start}: no cycle in its component {sorted(comp)}")


def cycle_text(cycle: Sequence[Import]) -> str:
    """``a -> b -> a`` and, indented, each edge's file:line."""
    head = " -> ".join([cycle[0].src, *(i.dst for i in cycle)])
    return head + "".join(f"\n    {i}" for i in cycle)


# ---------------------------------------------------------------------------------------------
# the rules


@dataclass(frozen=True)
class Rule:
    """Modules under ``source`` must not import modules under any of ``forbidden``, except those
    under ``allowed`` and the single edges of ``allowed_edges`` (``(src, dst, why)``). A module
    importing itself or a package it is in is not a violation."""

    name: str
    source: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    allowed_edges: tuple[tuple[str, str, str], ...] = ()

    def violations(self, graph: ImportGraph) -> list[Import]:
        edges = {(src, dst) for src, dst, _ in self.allowed_edges}
        return [i for i in graph.edges(self.source)
                if any(under(i.dst, f) for f in self.forbidden)
                and not any(under(i.dst, a) for a in self.allowed)
                and (i.src, i.dst) not in edges
                and not under(i.src, i.dst)]


RULES: tuple[Rule, ...] = (
    # stages talk through files only: what two stages share lives in mmalign
    Rule("no stage imports another stage", source="data_pipelines", forbidden=("data_pipelines",)),
    # the core defines the protocols; models/ and the stages implement and use them
    Rule("mmalign never imports models, data_pipelines or benchmarks", source="mmalign",
         forbidden=("models", "data_pipelines", "benchmarks")),
    # a method is its module; what methods share (losses, reward models at use time, generation
    # health, the base module) lives below them. Two methods *are* extensions of another, by
    # subclassing, and say so here.
    Rule("no method imports another method", source="mmalign.methods", forbidden=("mmalign.methods",),
         allowed=("mmalign.methods.base",),
         allowed_edges=(("mmalign.methods.realign", "mmalign.methods.dpo",
                         "rDPO is DPO plus the image-conditional term: RealignModule subclasses DPOModule"),
                        ("mmalign.methods.dress", "mmalign.methods.sft",
                         "DRESS's conditional RL is weighted SFT: DRESSModule subclasses SFTModule"))),
)

#: packages whose modules must not import each other in a circle
ACYCLIC: tuple[str, ...] = ("mmalign",)
#: cycles known and not fixed yet: (package, the modules of the cycle's strongly connected
#: component, why it is still there). Such a component is left out of test_no_import_cycles and
#: gets its own xfail(strict=True) case instead, which fails (XPASS) once the cycle is gone, so the
#: entry is removed then. Any other cycle fails test_no_import_cycles at once.
KNOWN_CYCLES: tuple[tuple[str, frozenset[str], str], ...] = ()


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph.build()


def test_every_file_is_parsed_and_imports_are_found_everywhere(graph):
    assert {m.split(".")[0] for m in graph.modules} == set(PACKAGES)
    where = {i.where for i in graph.imports}
    assert {"module", "function"} <= where, where  # function-level imports are seen too
    # known imports of each kind, resolved to the module: ``from mmalign.feedback_io import ...`` at
    # module level, ``from mmalign.oracle import WorldOracle`` inside nlf's main
    got = {(i.src, i.dst, i.where) for i in graph.imports}
    assert ("data_pipelines.prefs", "mmalign.feedback_io", "module") in got
    assert ("data_pipelines.nlf", "mmalign.oracle", "function") in got


def test_graph_builder_on_a_small_tree(tmp_path):
    """Relative, from-package, function-level, TYPE_CHECKING and dynamic imports, and a cycle."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("import os\nfrom p.sub import b as B, helper\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n"
                              "import importlib\nm = importlib.import_module('p.sub.b')\n")
    g = ImportGraph.build(["p"], root=tmp_path)
    got = {(i.src, i.dst, i.where) for i in g.imports}
    assert ("p.a", "os", "module") in got
    assert ("p.a", "p.sub.b", "module") in got and ("p.a", "p.sub", "module") in got  # helper: a name in p.sub
    assert ("p.sub", "p.sub.b", "module") in got
    assert ("p.sub.b", "p.a", "function") in got
    assert ("p.c", "p.a", "type-checking") in got and ("p.c", "p.sub.b", "dynamic") in got
    assert g.components("p") == [frozenset({"p.a", "p.sub", "p.sub.b"})]
    cycles = g.cycles("p")
    assert len(cycles) == 1
    assert cycle_text(cycles[0]).splitlines()[0] == "p.a -> p.sub.b -> p.a"
    rule = Rule("p.c imports nothing of p.sub", source="p.c", forbidden=("p.sub",))
    assert [(i.src, i.dst) for i in rule.violations(g)] == [("p.c", "p.sub.b")]
    assert Rule("x", source="p.sub", forbidden=("p.sub",)).violations(g) == [
        i for i in g.imports if i.src == "p.sub" and i.dst == "p.sub.b"]  # its own package: fine, a submodule: not
    excused = Rule("p.c imports nothing of p.sub", source="p.c", forbidden=("p.sub",),
                   allowed_edges=(("p.c", "p.sub.b", "a declared exception"),))
    assert excused.violations(g) == []


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_layering(graph, rule):
    bad = rule.violations(graph)
    assert not bad, f"{rule.name}: {len(bad)} import(s) break it:\n" + "\n".join(map(str, bad))


def _unknown_cycles(graph: ImportGraph, package: str) -> list[list[Import]]:
    known = {modules for p, modules, _ in KNOWN_CYCLES if p == package}
    return [c for comp, c in zip(graph.components(package), graph.cycles(package)) if comp not in known]


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_cycles(graph, package):
    cycles = _unknown_cycles(graph, package)
    assert not cycles, (f"{len(cycles)} import cycle(s) among the modules of {package} (module- and "
                        f"function-level imports together):\n" + "\n".join(map(cycle_text, cycles)))


if KNOWN_CYCLES:
    @pytest.mark.parametrize(("package", "modules"), [
        pytest.param(p, m, id=" <-> ".join(sorted(m)),
                     marks=pytest.mark.xfail(strict=True, reason=f"known import cycle {' <-> '.join(sorted(m))}: {why}"))
        for p, m, why in KNOWN_CYCLES])
    def test_known_cycle_is_gone(graph, package, modules):
        still = [c for comp, c in zip(graph.components(package), graph.cycles(package)) if comp == modules]
        assert not still, "\n".join(map(cycle_text, still))

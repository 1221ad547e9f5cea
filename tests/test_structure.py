"""The library's shape, checked on its source: no import cycle among ddkit's modules (function-level imports
included), no method named outside ``ddkit/methods/``, and a library that never imports the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ddkit"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)] = p
    return mods


def import_edges() -> dict[str, set[str]]:
    """module -> the ddkit modules it imports anywhere in its body (``if TYPE_CHECKING`` blocks included)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        is_pkg = p.name == "__init__.py"
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == "ddkit" else None
                # a package importing its own submodule, or a submodule its package: not a cycle of concepts
                if r and r != m and not (m.startswith(r + ".") and mods[r].name == "__init__.py"):
                    edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_ddkit_modules():
    assert cycles(import_edges()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_cli():
    edges = import_edges()
    bad = [(m, t) for m, ts in edges.items() for t in ts if t.startswith("ddkit.cli") and not m.startswith("ddkit.cli")]
    assert bad == []


def _name_test():
    from ddkit.methods import registry

    names = "|".join(re.escape(n) for n in registry.METHODS if n != "minimax")  # minimax is also a stage
    return re.compile(rf'(==|!=|\bin)\s*[(\[{{]?[^#\n]*"({names})(\+select)?"|"({names})(\+select)?"\s*(==|!=)')


def test_the_name_check_finds_a_name_test():
    pattern = _name_test()
    assert pattern.search('if method == "d3hr":') and pattern.search('if m in ("dit", "mgd3"):')
    assert not pattern.search('method = build("d3hr", cfg)')


def test_no_method_name_is_compared_outside_ddkit_methods():
    """The library asks a method (:mod:`ddkit.methods.base`); it never tests a method's name."""
    pattern = _name_test()
    hits = []
    for p in PKG.rglob("*.py"):
        if "methods" in p.relative_to(PKG).parts[:1]:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                hits.append(f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert hits == []

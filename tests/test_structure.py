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


# Third-party packages whose import costs tenths of a second or more (torch ~1-2 s, diffusers ~1 s, sklearn,
# matplotlib, numpy ~0.1 s): a function-level import is kept only to keep one of them out of its module.
HEAVY = frozenset({"torch", "torchvision", "diffusers", "sklearn", "matplotlib", "submitit", "webdataset",
                   "timm", "scipy", "numpy", "PIL", "transformers", "safetensors", "huggingface_hub"})  # fmt: skip


def _imported(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_pkg else module.split(".")[:-1]
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
    return [f"{base}.{a.name}" for a in node.names] + [base]


def _top_level(tree: ast.Module) -> list[ast.AST]:
    """The module's import statements that run at import time (``if TYPE_CHECKING`` blocks excluded)."""
    out: list[ast.AST] = []

    def walk(body):
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.append(n)
            elif isinstance(n, ast.If) and not (isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"):
                walk(n.body + n.orelse)
            elif isinstance(n, ast.Try):
                walk(n.body + [s for h in n.handlers for s in h.body])

    walk(tree.body)
    return out


def heavy_at_import() -> dict[str, set[str]]:
    """module -> the :data:`HEAVY` packages that importing it loads (its top-level imports, transitively,
    with the parent packages that Python imports first)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    direct: dict[str, tuple[set[str], set[str]]] = {}
    for m, p in mods.items():
        ddk = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
        ext: set[str] = set()
        for node in _top_level(ast.parse(p.read_text())):
            for t in _imported(node, m, p.name == "__init__.py"):
                if t.split(".")[0] == "ddkit":
                    r = resolve(t)
                    ddk |= {".".join(r.split(".")[: i + 1]) for i in range(r.count(".") + 1)} if r else set()
                elif t.split(".")[0] in HEAVY:
                    ext.add(t.split(".")[0])
        direct[m] = (ddk & set(mods), ext)
    out = {}
    for m in mods:
        seen, todo, heavy = {m}, [m], set()
        while todo:
            ddk, ext = direct[todo.pop()]
            heavy |= ext
            todo += [d for d in ddk - seen]
            seen |= ddk
        out[m] = heavy
    return out


def test_function_level_imports_only_keep_a_heavy_library_out_of_their_module():
    """A function-level import is there to keep its module free of a heavy library at import time (so
    ``ddkit --help``, config validation and ``ddkit submit`` on a login node stay torch-free); one that
    loads nothing heavy the module lacks belongs at the top."""
    mods, heavy = _modules(), heavy_at_import()

    def brings(node, m):
        out = set()
        for t in _imported(node, m, mods[m].name == "__init__.py"):
            if t.split(".")[0] == "ddkit":
                name = t
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                out |= heavy.get(name, set())
            elif t.split(".")[0] in HEAVY:
                out.add(t.split(".")[0])
        return out

    bad = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        for f in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for stmt in f.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))):
                if not brings(node, m) - heavy[m]:
                    bad.append(f"{p.relative_to(PKG.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "move to the top of the module:\n" + "\n".join(sorted(set(bad)))


def test_the_cli_loads_no_heavy_library():
    """``ddkit --help`` imports every command module: none of them may load torch (or another heavy
    library) at import time."""
    heavy = heavy_at_import()
    assert {m: sorted(h) for m, h in heavy.items() if m.startswith("ddkit.cli") and h} == {}

"""Import hygiene of the cptoy package, read from the source with ``ast`` (nothing is imported):

* no module uses another module's ``_private`` name (``from cptoy.x import _y`` or ``x._y``);
* the graph of module-level imports among cptoy modules has no cycle.

Run as a script (``python tests/test_repo_imports.py``) it prints both counts and every
offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cptoy"
ALLOWED = {"cptoy._checks"}  # a shared private *module* whose names are public to the package


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The cptoy module a dotted name refers to (a module, or a name inside one)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mod: str, path: Path, mods: dict[str, Path]):
    """(module-level imports, every import, aliases) of one module.

    Returns ``(top, every, alias)``: ``top`` the cptoy modules imported at module level,
    ``every`` a list of (line, imported module, imported name | None), ``alias`` local name ->
    cptoy module for ``import cptoy.x as y`` / ``from cptoy import x``."""
    tree = ast.parse(path.read_text(), str(path))
    top: set[str] = set()
    every: list[tuple[int, str, str | None]] = []
    alias: dict[str, str] = {}
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

    def visit(node, level: int):
        for child in ast.iter_child_nodes(node):
            inner = level + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for a in child.names:
                    target = _resolve(a.name, mods)
                    if target:
                        every.append((child.lineno, target, None))
                        alias[a.asname or a.name] = target
                        if level == 0:
                            top.add(target)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for a in child.names:
                    sub = _resolve(f"{base}.{a.name}", mods)
                    target = sub if sub == f"{base}.{a.name}" else _resolve(base, mods)
                    if not target:
                        continue
                    name = None if sub == f"{base}.{a.name}" else a.name
                    every.append((child.lineno, target, name))
                    if name is None:
                        alias[a.asname or a.name] = target
                    if level == 0:
                        top.add(target)
            visit(child, inner)

    visit(tree, 0)
    return tree, top, every, alias


def private_uses() -> list[str]:
    """Every use of another cptoy module's ``_private`` name, as "module:line name"."""
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        tree, _top, every, alias = _imports(mod, path, mods)
        for line, target, name in every:
            if target != mod and target not in ALLOWED and name and name.startswith("_"):
                bad.append(f"{mod}:{line} from {target} import {name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = alias.get(node.value.id)
                if target and target != mod and target not in ALLOWED:
                    bad.append(f"{mod}:{node.lineno} {node.value.id}.{node.attr}")
    return bad


def import_cycles(everywhere: bool = True) -> list[list[str]]:
    """Cycles in the graph of imports among cptoy modules: every import, also those inside
    functions (``everywhere=False``: module-level imports only)."""
    mods = _modules()
    graph = {}
    for m, p in mods.items():
        _tree, top, every, _alias = _imports(m, p, mods)
        graph[m] = sorted(({t for _, t, _ in every} if everywhere else top) - {m, "cptoy"})
    cycles, state = [], {}

    def dfs(m, stack):
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, []):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n, stack)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m, [])
    return cycles


def test_no_private_names_cross_modules():
    assert private_uses() == []


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_checker_sees_what_it_should(tmp_path, monkeypatch):
    """Negative control: a private import and a cycle in a fake package are both reported."""
    pkg = tmp_path / "cptoy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cptoy.b import _hidden\n")
    (pkg / "b.py").write_text("import cptoy.a as a\n_hidden = 1\nx = a._y\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    assert sorted(private_uses()) == ["cptoy.a:1 from cptoy.b import _hidden", "cptoy.b:3 a._y"]
    assert import_cycles() == [["cptoy.a", "cptoy.b", "cptoy.a"]]


if __name__ == "__main__":
    uses, cycles = private_uses(), import_cycles()
    print(f"{len(uses)} cross-module private uses, {len(cycles)} import cycles "
          f"({len(import_cycles(everywhere=False))} among module-level imports)")
    for u in uses:
        print("  ", u)
    for c in cycles:
        print("   cycle:", " -> ".join(c))

"""The package layout, enforced: a module's folder says what it may import.

The graph is built from the source (ast), every import counted, lazy ones inside functions and those
under `if TYPE_CHECKING:` included (a cycle of type hints is still a cycle a reader must untangle):
- no import cycle anywhere in planner/ or plugins/;
- the engine (planner/engine/), the serving model (planner/serving/) and the top-level nouns never
  import torch, transformers, peft, bitsandbytes, deepspeed, trl or pandas, even lazily;
- nothing outside planner/backends/ imports planner/backends/ at module level, and the engine and
  serving packages do not import it at all: backends sit on top of the engine, never under it;
- planner/commands/ is what the CLI dispatches to, and nothing else imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "deepspeed", "trl", "pandas"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts[0] = "planner_plugins"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.joinpath("planner").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]
    return {_module_name(p): p for p in files}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported name, at module level) for every import in the file, absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    # imports inside `if TYPE_CHECKING:` at module level count as module level
    for n in tree.body:
        if isinstance(n, ast.If):
            top_level |= {id(x) for x in n.body}
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, id(node) in top_level))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _edges(name: str) -> set[str]:
    return {m for m, _ in GRAPH[name] if m in MODULES and m != name}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in _edges(v):
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

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return out


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_graph_sees_the_layout():
    assert "planner.engine.distributed.ranks" in MODULES and "planner.backends.dryrun._run" in MODULES
    assert "planner.engine.compute" in _edges("planner.engine.distributed.ranks")


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle():
    GRAPH["planner.units"].append(("planner.api", False))
    try:
        assert any("planner.units" in c for c in _cycles())
    finally:
        GRAPH["planner.units"].pop()


PURE = [m for m in MODULES if not _in(m, "planner.backends") and not _in(m, "planner.commands")
        and not m.startswith("planner_plugins") and m != "planner.cli"]


def test_the_engine_serving_and_nouns_import_no_torch():
    bad = {m: sorted({i.split(".")[0] for i, _ in GRAPH[m]} & HEAVY) for m in PURE}
    assert {m: v for m, v in bad.items() if v} == {}


def test_engine_and_serving_never_import_backends():
    for m in MODULES:
        if _in(m, "planner.engine") or _in(m, "planner.serving"):
            assert not any(_in(i, "planner.backends") for i, _ in GRAPH[m]), m


def test_backends_are_imported_lazily_from_outside():
    for m in MODULES:
        if _in(m, "planner.backends"):
            continue
        eager = [i for i, top in GRAPH[m] if top and _in(i, "planner.backends")]
        assert eager == [], (m, eager)


def test_only_the_cli_imports_the_commands():
    for m in MODULES:
        if _in(m, "planner.commands") or m == "planner.cli":
            continue
        assert not any(_in(i, "planner.commands") for i, _ in GRAPH[m]), m


def test_every_package_is_installed():
    """pyproject lists its packages by hand: a new sub-package missing there works in an editable
    install (the tests') and is absent from a wheel."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "planner").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)

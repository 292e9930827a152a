"""The package's imports follow the data flow: no cycles and no import against the declared stage order.

Module-level *and* function-local imports count. The order (lower may never import higher):
base layer -> slides -> tiling -> encoders -> features -> ssl.tile -> ssl.slide -> mil -> streaming -> nuclei
-> viewer / export -> testing -> cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gigaslide

ROOT = Path(gigaslide.__file__).parent
BASE = ("errors", "files", "atomic", "registry", "devices", "layers", "provenance", "runs", "locks", "safe_parse", "memory",
        "precisions", "evaluation")
ORDER = [BASE, ("slides",), ("tiling",), ("encoders",), ("features",), ("ssl", "ssl.tile"), ("ssl.slide",), ("mil",),
         ("streaming",), ("nuclei",), ("viewer", "export"), ("testing",), ("cli", "__main__")]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _rank(mod: str) -> int | None:
    rel = mod.removeprefix("gigaslide").lstrip(".")
    if not rel:
        return 0  # the package itself (version, GigaslideError)
    best = None
    for r, names in enumerate(ORDER):
        for n in names:
            if rel == n or rel.startswith(n + "."):
                best = r
    return best


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for mod, f in mods.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                if n.startswith("gigaslide"):
                    t = resolve(n)
                    if t and t != mod:
                        out.add(t)
        edges[mod] = out
    return edges


def test_every_module_has_a_declared_stage():
    assert [m for m in _modules() if _rank(m) is None] == []


def test_no_import_runs_against_the_stage_order():
    bad = [f"{m} (stage {_rank(m)}) imports {t} (stage {_rank(t)})"
           for m, ts in _imports(_modules()).items() for t in sorted(ts) if (_rank(t) or 0) > (_rank(m) or 0)]
    assert bad == []


def test_no_import_cycles_between_modules():
    edges = _imports(_modules())
    # a package's __init__ re-exporting its own submodules is not a cycle of logic
    cyc, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, ()):
            if t.startswith(m + "."):
                continue
            if state.get(t) == 1:
                cyc.append(" -> ".join(stack[stack.index(t):] + [t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cyc == []


def test_the_checker_sees_function_local_imports(tmp_path):
    pkg = tmp_path / "gigaslide"
    (pkg / "mil").mkdir(parents=True)
    (pkg / "mil" / "__init__.py").write_text("")
    (pkg / "mil" / "train.py").write_text("X = 1\n")
    (pkg / "tiling.py").write_text("def f():\n    from gigaslide.mil import train\n    return train\n")
    mods = {"gigaslide.mil": pkg / "mil" / "__init__.py", "gigaslide.mil.train": pkg / "mil" / "train.py",
            "gigaslide.tiling": pkg / "tiling.py"}
    edges = _imports(mods)
    assert edges["gigaslide.tiling"] == {"gigaslide.mil", "gigaslide.mil.train"}
    assert _rank("gigaslide.mil.train") > _rank("gigaslide.tiling")


def _is_submodule(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def test_every_gigaslide_name_imported_anywhere_exists():
    """``from gigaslide.x import name`` in the package, the tests and the benchmarks -- function-local imports
    included, which no import-time check runs -- names something that exists (a name moved between modules
    once broke a benchmark only when it reached that line)."""
    import importlib

    repo = ROOT.parents[1]
    files = [*ROOT.rglob("*.py"), *(repo / "tests").rglob("*.py"), *(repo / "benchmarks").glob("*.py")]
    missing = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gigaslide")):
                continue
            mod = importlib.import_module(node.module)
            for a in node.names:
                if a.name != "*" and not hasattr(mod, a.name) and not _is_submodule(f"{node.module}.{a.name}"):
                    missing.append(f"{f.relative_to(repo)}:{node.lineno}: {node.module}.{a.name}")
    assert len(files) > 100 and not missing, missing

"""The package's layers, read from the source: module-level imports form no cycle, and a lower
layer never imports a higher one (artifact and inputs know nothing of backends or the Engine;
nothing below the front ends imports a front end). Function-level imports (the lazy ones that
keep ``import clipfast`` cheap or an optional dependency optional) are not module-level edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lower number = lower layer; a module may import its own layer or lower ones only
LAYERS = {
    "clipfast.errors": 0, "clipfast.types": 0, "clipfast.settings": 0, "clipfast.cpu": 0,
    "clipfast.artifact": 1,
    "clipfast.inputs": 2, "clipfast.kernels": 2,
    "clipfast.backends": 3,
    # the export side writes artifacts with the runtime's own preprocessing, tokenizers and
    # batch profiles; the runtime never imports it at module level
    "clipfast.engine": 4, "clipfast.export": 4,
    # the torch backend runs the PyTorch source itself, loaded by the export side
    "clipfast.backends.torch": 4, "clipfast.backends.torch_attention": 4,
    "clipfast.bench": 5, "clipfast.embed": 5, "clipfast.serve": 5, "clipfast.search": 5,
    "clipfast.ray": 5, "clipfast.cli": 6,
}


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((ROOT / "clipfast", "clipfast"), (ROOT / "export", "clipfast.export")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """clipfast modules imported at module level (not inside a function, and not under
    ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # ``from pkg import submodule`` depends on the submodule; any other name is the
                # package's (or module's) own attribute
                subs = {f"{base}.{a.name}" for a in node.names} & known
                out.update(subs)
                if len(subs) < len(node.names):
                    out.add(base)
            if isinstance(node, ast.ClassDef):
                visit(node.body)
            elif hasattr(node, "body") and not isinstance(node, ast.ClassDef):
                visit(getattr(node, "body", []))
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return {m for m in out if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _module_level_imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len,
               default=None)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return LAYERS[best]


def test_every_module_has_a_layer(graph):
    for module in graph:
        if module != "clipfast":
            _layer(module)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := dfs(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_no_module_level_import_cycle(graph):
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_layers_never_import_higher_ones(graph):
    bad = [f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
           for m, deps in graph.items() if m != "clipfast"
           for n in deps if n != "clipfast" and _layer(n) > _layer(m)]
    assert not bad, "\n".join(sorted(bad))


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The walker is not blind: a planted cycle and a planted upward import are found."""
    a = tmp_path / "a.py"
    a.write_text("import clipfast.engine\nfrom clipfast.artifact import spec\n"
                 "def f():\n    import clipfast.serve\n")
    deps = _module_level_imports("clipfast.artifact.manifest", a,
                                 {"clipfast.engine", "clipfast.artifact.spec", "clipfast.serve",
                                  "clipfast.artifact"})
    assert deps == {"clipfast.engine", "clipfast.artifact.spec"}
    assert _layer("clipfast.engine") > _layer("clipfast.artifact.manifest")
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None

"""The house's floors: no import circle in ``mim/``, and no import from a lower floor to a higher
one. Every import counts, function-local ones included (they still tie the modules together)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mim"

# Low to high; a module may import its own floor and the floors below it. A name is a module or
# package under mim/ ("mim" alone is the package's own __init__, the public entry point).
LAYERS: list[list[str]] = [
    ["mim.typed_config"],  # generic typed YAML/dotlist loading; knows nothing of mim
    ["mim.errors", "mim.files"],  # mim.files: user JSON files, one-line errors
    ["mim.patching", "mim.masking", "mim.hog", "mim.checkpoint"],
    ["mim.losses", "mim.viz"],
    ["mim.data"],
    ["mim.metrics"],
    ["mim.models"],  # the encoder, its init, the classifier and the detector
    ["mim.methods"],  # one file per pretraining method
    ["mim.config"],  # the jobs' schemas and loading
    ["mim.probe"],  # k-NN / linear probes of an encoder on a labeled set
    ["mim.engine"],
    ["mim.inference"],  # load_model, predict, embed, export: using what the engine trained
    ["mim.cli", "mim.bench", "mim.__main__", "mim"],
]


def _module_name(path: Path) -> str:
    parts = ("mim",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The mim modules ``path`` imports, resolved to module names (``from a import b`` gives
    ``a.b`` when that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "mim" or m.startswith("mim.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in _imports(p, name) if m in files and m != name}
            for name, p in files.items()}


def _layer(module: str) -> int:
    best = None
    for i, floor in enumerate(LAYERS):
        for prefix in floor:
            if module == prefix or (prefix != "mim" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is on no floor: add it to LAYERS in this test"
    return best[0]


def test_every_module_is_on_a_floor():
    for module in _graph():
        _layer(module)


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = [f"{a} (floor {_layer(a)}) imports {b} (floor {_layer(b)})"
              for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The walk is not vacuous: a planted upward import and a function-local one are found."""
    pkg = tmp_path / "mim"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from mim.data import x\n")
    (pkg / "data" / "__init__.py").write_text("from mim.errors import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph = _graph()
    assert graph["mim.errors"] == {"mim.data"} and graph["mim.data"] == {"mim.errors"}
    assert _layer("mim.data") > _layer("mim.errors")


def test_the_method_registry_is_one_list_of_names():
    """Each name of METHOD_NAMES is the module mim/methods/<name>.py whose ``METHOD`` registers
    it, and the default ``name`` of its config section; no method file is left out."""
    from mim.methods import METHOD_NAMES, METHODS

    files = {p.stem for p in (ROOT / "methods").glob("*.py")}
    helpers = {"__init__", "base", "masked_prediction"}
    assert set(METHOD_NAMES) == files - helpers
    assert list(METHODS) == list(METHOD_NAMES)
    assert all(METHODS[n].config().name == n for n in METHOD_NAMES)

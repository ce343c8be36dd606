"""The package's architecture: imports point one way (no cycles, lazy imports included), modules and functions stay
short."""

from __future__ import annotations

import ast
from pathlib import Path

import repvgg

PACKAGE = Path(repvgg.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every ``repvgg`` module -> the ``repvgg`` modules it imports anywhere (top level or inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("repvgg"):
                base = node.module
                for alias in node.names:  # "from repvgg.nn import block" imports the submodule
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("repvgg"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or ``None``. Package ``__init__`` re-exports are skipped:
    importing ``repvgg.x`` runs ``repvgg/__init__`` first, but that is the public facade, not a layer."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            if target == "repvgg":
                continue
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start != "repvgg" and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "repvgg.nn.block" in graph["repvgg.nn.model"]  # the scan sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


#: The layers, lowest first: a module imports only from its own layer or those before it. The measuring tools of
#: ``perf`` sit low (every job times and probes); its fast path and benchmark sit above ``quant``, whose INT8
#: models they run. A module takes the layer of the longest entry that names it.
LAYERS = ["repvgg.errors", "repvgg.limits", "repvgg.serialization", "repvgg.options", "repvgg.lazy", "repvgg.plots",
          "repvgg.report", "repvgg.nn", "repvgg.io", "repvgg.measure", "repvgg.training", "repvgg.dense",
          "repvgg.segmentation", "repvgg.detection",
          "repvgg.integrations", "repvgg.quant", "repvgg.perf", "repvgg.predict", "repvgg.serve", "repvgg.cli",
          "repvgg.__main__"]


def layer(module: str, order: list[str] = LAYERS) -> int | None:
    matches = [(len(prefix), i) for i, prefix in enumerate(order)
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def layer_violations(graph: dict[str, set[str]], order: list[str] = LAYERS) -> tuple[list[str], list[tuple[str, str]]]:
    """``(modules in no layer, imports that point up)``; the package facade ``repvgg`` is the one module
    outside the layers (it re-exports the public names lazily)."""
    unlayered = sorted(m for m in graph if m != "repvgg" and layer(m, order) is None)
    upward = [(m, t) for m, targets in graph.items() for t in targets
              if layer(m, order) is not None and layer(t, order) is not None and layer(t, order) > layer(m, order)]
    return unlayered, upward


def test_layers_point_one_way() -> None:
    """nn (models, fusion) imports no file formats, training or CLI; file formats know nothing of training; every
    module is in a layer."""
    unlayered, upward = layer_violations(import_graph())
    assert not unlayered, f"modules in no layer (add them to LAYERS and docs/layout.md): {unlayered}"
    assert not upward, upward


def test_a_folder_is_one_floor() -> None:
    """No layer is a part of another's folder: a folder split across floors lets its low part be imported from below
    while its high part imports from above, which is how imports come to run up a floor unseen."""
    nested = [(inner, outer) for inner in LAYERS for outer in LAYERS if inner.startswith(outer + ".")]
    assert nested == []


def test_the_layer_check_finds_what_it_looks_for() -> None:
    graph = {"repvgg": set(), "repvgg.nn.model": {"repvgg.cli.train"}, "repvgg.cli.train": {"repvgg.nn.model"},
             "repvgg.newthing": set()}
    assert layer_violations(graph) == (["repvgg.newthing"], [("repvgg.nn.model", "repvgg.cli.train")])


def test_the_layout_page_matches_the_tree() -> None:
    section = (PACKAGE.parents[1] / "docs" / "layout.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in row.split("|")[1].replace("`", "").replace(",", " ").split()}
    for name in listed:
        assert (PACKAGE / name).exists(), f"docs/layout.md lists {name}, which is not in src/repvgg"
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    covered = {m for m in modules if m in listed or any(m.startswith(d) for d in listed if d.endswith("/"))}
    assert modules == covered, f"modules missing from docs/layout.md: {sorted(modules - covered)}"


#: Limits that keep every module and function readable in one sitting.
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 100


def oversized(sources: dict[str, str]) -> list[str]:
    """Modules over :data:`MAX_MODULE_LINES` lines and functions (methods and nested ones too) over
    :data:`MAX_FUNCTION_LINES`, as ``"name: N lines"``."""
    found = []
    for name, text in sorted(sources.items()):
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{name}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {n} lines")
    return found


def test_modules_and_functions_stay_within_their_limits() -> None:
    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert len(sources) > 30
    assert oversized(sources) == []


def test_the_size_check_finds_what_it_looks_for() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_function = f"def f():\n{body}"
    assert oversized({"a.py": long_function}) == [f"a.py:1 f: {MAX_FUNCTION_LINES + 1} lines"]
    assert oversized({"b.py": "x = 1\n" * (MAX_MODULE_LINES + 1)}) == [f"b.py: {MAX_MODULE_LINES + 1} lines"]
    assert oversized({"c.py": "x = 1\n" * MAX_MODULE_LINES}) == []


def test_the_dense_tasks_share_only_what_lies_below_them() -> None:
    """Segmentation and detection stand side by side: neither imports the other."""
    graph = import_graph()
    assert any(t.startswith("repvgg.dense") for t in graph["repvgg.detection.train"])
    for module, targets in graph.items():
        for one, other in (("repvgg.segmentation", "repvgg.detection"), ("repvgg.detection", "repvgg.segmentation")):
            if module.startswith(one):
                assert not any(t.startswith(other) for t in targets), (module, targets)

"""The architecture the README describes, checked on the source tree (issue "One house").

No source file over 600 lines, no import cycle between modules, no private name imported across modules,
no library module importing command-line code, lower layers never importing upper ones, and one
glossary of jaxtyping axis names.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from degeneracy.axes import AXES

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "degeneracy"
MAX_LINES = 600

# Layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS: list[set[str]] = [
    {"axes", "deprecation", "linalg", "io", "lazy", "display", "distributed", "progress"},
    {"data", "layout", "fingerprint"},
    {"run", "capture", "stats", "checks"},
    {"behavioral", "jacobian", "basis_result", "graph_result", "cuts"},
    {"adapters", "sections", "probes"},
    {"attributions", "basis", "accounting", "llc"},
    {"edges"},
    {"ablation", "modules", "fourier", "models"},
    {"report"},
    {"commands", "__main__"},
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every degeneracy import, resolving relatives."""
    is_package = (SRC.parent / name.replace(".", "/") / "__init__.py").exists()
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module.split(".")[0] == "degeneracy":
                found.append((module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "degeneracy":
                    found.append((alias.name, [], node.lineno))
    return found


MODULES = _modules()


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    top = _top(module)
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module} is in no layer of LAYERS: add it to the architecture test")


def test_no_file_over_600_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"source files over {MAX_LINES} lines: {long}"


def test_no_private_name_imported_across_modules():
    bad = [
        f"{name}:{line} imports {imported}.{n}"
        for name, tree in MODULES.items()
        for imported, names, line in _imports(name, tree)
        for n in names
        if n.startswith("_") and not n.startswith("__") and imported != name
    ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_library_never_imports_commands():
    bad = [
        f"{name}:{line} imports {imported}"
        for name, tree in MODULES.items()
        if _top(name) not in ("commands", "__main__")
        for imported, _, line in _imports(name, tree)
        if _top(imported) == "commands"
    ]
    assert not bad, "library modules importing command-line code:\n" + "\n".join(bad)


def test_every_module_sits_in_a_layer():
    for name in MODULES:
        if name != "degeneracy":
            _layer(name)


def test_lower_layers_never_import_upper_ones():
    bad = []
    for name, tree in MODULES.items():
        if name == "degeneracy":
            continue  # the package __init__ re-exports the public API lazily
        for imported, _, line in _imports(name, tree):
            if imported == "degeneracy":
                continue  # `import degeneracy` for __version__
            if _layer(imported) > _layer(name):
                bad.append(f"{name}:{line} imports {imported} (layer {_layer(imported)} > {_layer(name)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, tree in MODULES.items():
        for imported, names, _ in _imports(name, tree):
            targets = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in MODULES] or [imported]
            for target in targets:
                while target not in MODULES and "." in target:
                    target = target.rpartition(".")[0]
                if target in MODULES and target != name and target != "degeneracy":
                    graph[name].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def _shape_strings() -> list[tuple[str, int, str]]:
    found = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("Float", "Int", "Bool", "Shaped", "Integer", "Real", "Num")
                and isinstance(node.slice, ast.Tuple)
                and len(node.slice.elts) == 2
                and isinstance(node.slice.elts[1], ast.Constant)
            ):
                found.append((name, node.lineno, node.slice.elts[1].value))
    return found


def test_shape_annotations_use_the_glossary():
    strings = _shape_strings()
    assert strings, "no jaxtyping annotations found"
    bad = []
    for name, line, shape in strings:
        for token in shape.split():
            axis = token.lstrip("*#")
            if axis in ("...", "") or axis.isdigit():
                continue
            if axis not in AXES:
                bad.append(f"{name}:{line} axis {token!r} in {shape!r}")
    assert not bad, "axis names missing from degeneracy.axes.AXES:\n" + "\n".join(bad)


def _public_definitions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]]:
    """Top-level public functions and classes (those in ``__all__`` where a module declares one)."""
    found = []
    for name, tree in MODULES.items():
        exported = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                try:
                    exported = set(ast.literal_eval(node.value))
                except ValueError:
                    exported = None
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name.startswith("_") or (exported is not None and node.name not in exported):
                    continue
                found.append((name, node))
    return found


def test_every_public_function_has_a_runnable_example():
    """Each public function and class shows a ``>>>`` example (run as a doctest by the test suite)."""
    missing = [
        f"{name}.{node.name}"
        for name, node in _public_definitions()
        if ">>>" not in (ast.get_docstring(node) or "")
    ]
    assert not missing, f"{len(missing)} public definitions without a >>> example:\n" + "\n".join(missing)

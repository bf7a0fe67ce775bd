"""The layout holds: small files and classes, imports in one direction, no private reach-ins.

Read from the source with ``ast`` (nothing is imported), so a change that breaks a rule fails
here with the file and line, before anyone has to find it by reading the tree.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
PKG = ROOT / "torchwatch"
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 400
# imports allowed inside functions: optional or heavy dependencies `import torchwatch` must not load
# (tests/test_package.py checks that), loaded on first use
OPTIONAL = ("prometheus_client", "tensorboard", "torch.utils.tensorboard", "triton", "transformers", "safetensors")
OPTIONAL_OWN = {
    "torchwatch.kernels.triton_stats",
    "torchwatch.kernels.triton_fingerprint",
    "torchwatch.kernels._cstats",
}
# parts that must use the engine's public API only
CLIENTS = ("shadow", "cli", "monitors")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _from(module: str, node: ast.ImportFrom) -> str:
    """The module a ``from X import ...`` in ``module`` names as X, absolute."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The torchwatch modules an ``from ... import ...`` loads (submodules named in it included)."""
    target = _from(module, node)
    if not target.startswith("torchwatch"):
        return []
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return found if len(found) == len(node.names) else [*found, target]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str, tree: ast.Module, *, types: bool = False) -> tuple[set[str], list[tuple[int, str]]]:
    """Module-level torchwatch imports (``types``: those under ``if TYPE_CHECKING:`` too), and the
    imports inside functions (line, what)."""
    top: set[str] = set()
    inner: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child) and not types:
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                    own = [n for n in names if n.startswith("torchwatch")]
                else:
                    own = _resolve(module, child)
                    names = own or [child.module or ""]
                if in_function:
                    inner.extend((child.lineno, n) for n in names)
                else:
                    top.update(n for n in own if n != module)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, inner


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
GRAPH = {name: _imports(name, tree)[0] for name, tree in TREES.items()}
# what a module names, types included: a cycle through a TYPE_CHECKING import is still a cycle in the design
GRAPH_WITH_TYPES = {name: _imports(name, tree, types=True)[0] for name, tree in TREES.items()}


def test_no_file_or_class_is_too_big_to_read():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]  # fmt: skip
    for name, tree in TREES.items():
        big += [f"{name}.{c.name}: {c.end_lineno - c.lineno + 1} lines" for c in ast.walk(tree)
                if isinstance(c, ast.ClassDef) and c.end_lineno - c.lineno + 1 > MAX_CLASS_LINES]  # fmt: skip
    assert not big, big


def test_imports_form_no_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH_WITH_TYPES.get(node, ())):
            if nxt == "torchwatch" or nxt.startswith(node + "."):
                continue  # the top package re-exports everything; a package may import its own parts
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH_WITH_TYPES):
        if name not in state:
            visit(name)


def test_imports_inside_functions_are_for_optional_dependencies_only():
    bad = []
    for name, tree in TREES.items():
        for line, what in _imports(name, tree)[1]:
            if not (what.startswith(OPTIONAL) or what in OPTIONAL_OWN):
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {what} inside a function")
    assert not bad, bad


def test_shadow_cli_and_monitors_use_no_private_name_of_the_engine():
    bad = []
    for name, tree in TREES.items():
        if not name.startswith(tuple(f"torchwatch.{c}" for c in CLIENTS)):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, node)
                if any(t.startswith("torchwatch.engine") for t in targets):
                    bad += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value).split(".")[-1].lower()
                if owner != "self" and any(word in owner for word in ("watch", "engine", "bus")):
                    bad.append(f"{name}:{node.lineno} reads {ast.unparse(node)}")
    assert not bad, bad


def test_the_engine_does_not_import_what_sits_above_it():
    above = ("torchwatch.watch", "torchwatch.shadow", "torchwatch.cli")
    bad = [f"{name} imports {dep}" for name, deps in GRAPH.items() if name.startswith("torchwatch.engine")
           for dep in deps if dep.startswith(above)]  # fmt: skip
    bad += [f"{name} imports {dep}" for name, deps in GRAPH.items() if name.startswith("torchwatch.monitors")
            for dep in deps if dep.startswith(("torchwatch.engine", *above))]  # fmt: skip
    assert not bad, bad


def _owner(module: str) -> str:
    """The package a module belongs to (a package owns itself)."""
    return module if _is_package(module) else module.rsplit(".", 1)[0]


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _private_reach_ins() -> list[str]:
    """Imports of a private module or a private name from outside the package that owns it.

    The top package's own private modules (``torchwatch._casts``, ...) are the library's shared
    internals, open to every part; a private module of a subpackage (``integrity._safetensors``)
    is its package's, and a private name (``_float_dtypes``) is its module's package's."""
    bad = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _from(name, node)
            if not base.startswith("torchwatch"):
                continue
            for alias in node.names:
                module = f"{base}.{alias.name}"
                if module in MODULES:  # a module imported by name
                    target, private = module, any(_private(part) for part in module.split(".")[2:])
                else:
                    target = base
                    private = _private(alias.name) or any(_private(part) for part in base.split(".")[2:])
                if module not in MODULES and _private(alias.name):  # a private name: its own package's
                    if _owner(name) != _owner(target):
                        bad.append(f"{name}:{node.lineno} imports {alias.name} from {base}")
                    continue
                owner = _owner(target)
                if private and not (name == owner or name.startswith(owner + ".")):
                    bad.append(f"{name}:{node.lineno} imports {alias.name} from {base}")
    return bad


def test_no_part_uses_a_private_name_of_another_package():
    bad = _private_reach_ins()
    assert not bad, bad


def test_the_engine_and_the_records_know_no_concrete_monitor():
    bad = [f"{name} imports {dep}" for name, deps in GRAPH_WITH_TYPES.items()
           if name.startswith("torchwatch.engine") or name == "torchwatch.records"
           for dep in deps if dep.startswith("torchwatch.monitors") and dep not in ("torchwatch.monitors.base",)]  # fmt: skip
    assert not bad, bad

"""The architecture's rules, read from the source (every import, function-level ones included):

- imports flow ``tuner -> defenses -> zoo``: zoo imports neither, defenses not tuner;
- ``tuner/trainable.py`` is the only module that imports ``ray``; defenses and zoo import
  neither ray nor optuna;
- no module touches a private attribute of Ray or Optuna (``ray._private``, ``study._storage``,
  ``ray.init(_system_config=...)``);
- no import cycle between the project's modules.

The checks are functions of a source tree, so the tests below also show that each one fails
on a tree that breaks it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuner", "defenses", "zoo", "bench")
LAYER = {"zoo": 0, "defenses": 1, "tuner": 2, "bench": 3}
RAY_MODULES = {"tuner.trainable"}
PRIVATE_ROOTS = ("ray", "optuna")


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for the project's packages under ``root``."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(tree: ast.AST, module: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in ``tree``, at any depth. ``from a import b``
    yields ``a.b`` when that is a module, else ``a``. (The project uses no relative imports;
    one is reported as importing ``.``, which no rule accepts silently.)"""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def layering_errors(root: Path) -> list[str]:
    mods = modules(root)
    known = set(mods)
    errors = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, line in imports(tree, name, known):
            where = f"{path.relative_to(root)}:{line}"
            top = _top(target)
            if top in LAYER and LAYER[top] > LAYER[_top(name)]:
                errors.append(f"{where}: {name} imports {target} (imports flow tuner -> "
                              "defenses -> zoo)")
            if top == "ray" and name not in RAY_MODULES:
                errors.append(f"{where}: {name} imports ray (only {', '.join(RAY_MODULES)} may)")
            if top == "optuna" and _top(name) in ("zoo", "defenses"):
                errors.append(f"{where}: {name} imports optuna")
    return errors


def _bound_names(tree: ast.AST) -> set[str]:
    """Names bound to Ray or Optuna objects by imports (``import ray``, ``from ray import
    tune``, ``import optuna.trial as t``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _top(a.name) in PRIVATE_ROOTS:
                    names.add(a.asname or _top(a.name))
        elif isinstance(node, ast.ImportFrom) and _top(node.module or "") in PRIVATE_ROOTS:
            names.update(a.asname or a.name for a in node.names)
    return names


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def private_api_errors(root: Path) -> list[str]:
    errors = []
    for path in modules(root).values():
        tree = ast.parse(path.read_text(), str(path))
        bound = _bound_names(tree)
        rel = path.relative_to(root)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names]
                dotted = [*(mod or "").split("."), *[p for n in names for p in n.split(".")]]
                if _top(mod or names[0]) in PRIVATE_ROOTS and any(_private(p) for p in dotted):
                    errors.append(f"{rel}:{node.lineno}: private Ray/Optuna import")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                inner = node.value
                while isinstance(inner, ast.Attribute):
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id in bound:
                    errors.append(f"{rel}:{node.lineno}: private attribute {node.attr} of {inner.id}")
            elif isinstance(node, ast.Call):
                func = node.func
                while isinstance(func, ast.Attribute):
                    func = func.value
                if isinstance(func, ast.Name) and func.id in bound:
                    for kw in node.keywords:
                        if kw.arg and _private(kw.arg):
                            errors.append(f"{rel}:{node.lineno}: private argument {kw.arg}")
    return errors


def cycles(root: Path) -> list[list[str]]:
    """Import cycles between the project's modules (every import, at any depth)."""
    mods = modules(root)
    known = set(mods)
    graph = {name: sorted({t for t, _ in imports(ast.parse(path.read_text()), name, known)
                           if t in known and t != name})
             for name, path in mods.items()}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name)
    return found


def test_imports_follow_the_layers_and_only_trainable_imports_ray() -> None:
    assert layering_errors(ROOT) == []


def test_no_private_attribute_of_ray_or_optuna() -> None:
    assert private_api_errors(ROOT) == []


def test_no_import_cycle() -> None:
    assert cycles(ROOT) == []


# -- each check fails on a tree that breaks its rule ----------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "needle"), [
    ({"zoo/data.py": "def f():\n    from tuner import spec\n"}, "zoo.data imports tuner"),
    ({"defenses/ft.py": "def f():\n    import tuner.search\n"}, "imports tuner.search"),
    ({"tuner/search.py": "def f():\n    import ray\n"}, "tuner.search imports ray"),
    ({"zoo/x.py": "import optuna\n"}, "zoo.x imports optuna"),
])
def test_layering_check_sees_imports_inside_functions(tmp_path: Path, files: dict[str, str],
                                                      needle: str) -> None:
    errors = layering_errors(_tree(tmp_path, files))
    assert any(needle in e for e in errors), errors


@pytest.mark.parametrize("text", [
    "import ray\ndef f():\n    ray.init(_system_config={})\n",
    "from ray.tune.execution import class_cache\nclass_cache._ActorClassCache\n",
    "from ray._private import worker\n",
    "import optuna\ndef f(s):\n    return optuna.study._storage\n",
])
def test_private_api_check_sees_each_form(tmp_path: Path, text: str) -> None:
    assert private_api_errors(_tree(tmp_path, {"tuner/trainable.py": text}))


def test_cycle_check_sees_a_function_level_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"zoo/a.py": "from zoo import b\n",
                            "zoo/b.py": "def f():\n    from zoo.a import x\n"})
    assert cycles(root) == [["zoo.a", "zoo.b", "zoo.a"]]

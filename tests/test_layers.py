"""The package's folders are layers: imports point one way, from the doors down to the
models (docs/how-it-works.md, "The modules"). These tests keep that picture true."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_prodistill"
NAME = PACKAGE.name

# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ("shared", "models", "inputs", "plan", "output", "training", "doors")
# Root modules every layer may use; every other root module is a door.
SHARED = {"errors", "parallel", "formatting", "quiet", "layout"}
MAX_ROOT_MODULES = 15
MAX_LINES = 300


def modules():
    """Dotted name (without the package) -> parsed source, for every module."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = (path, ast.parse(path.read_text()))
    return found


def imports(name: str, tree: ast.AST, known) -> set:
    """The package's modules that ``name`` imports, anywhere in it (lazy imports too)."""
    package = name.split(".")[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name[len(NAME) + 1:] for a in node.names
                         if a.name.startswith(NAME + "."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module == NAME or (node.module or "").startswith(NAME + "."):
                module = node.module[len(NAME) + 1:]
            else:
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                child = f"{module}.{alias.name}" if module else alias.name
                found.add(child if child in known or f"{child}.__init__" in known else module)
    return {m for m in found if m}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in LAYERS or top == "tiny":
        return top
    return "shared" if top in SHARED else "doors"


def violations(graph) -> list:
    """Every import that points up a layer; tiny/ (the test models) imports only itself."""
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            if target in ("", "__init__"):  # the package itself: its version, nothing heavy
                continue
            mine, theirs = layer(module), layer(target)
            if "tiny" in (mine, theirs):
                ok = mine == theirs or mine == "doors"
            else:
                ok = LAYERS.index(theirs) <= LAYERS.index(mine)
            if not ok:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    return wrong


@pytest.fixture(scope="module")
def graph():
    found = modules()
    known = set(found)
    return {name: imports(name, tree, known) for name, (_, tree) in found.items()}


def test_imports_point_down_the_layers(graph):
    assert violations(graph) == []


def test_the_layer_rule_catches_an_upward_import(graph):
    upward = dict(graph, **{"models.blocks": graph["models.blocks"] | {"inputs.calibration"}})
    assert violations(upward) == ["models.blocks (models) imports inputs.calibration (inputs)"]
    assert violations({"tiny.text": {"models.blocks"}}) != []


def test_no_import_circle_between_modules(graph):
    # Only imports at module level can form a circle that breaks loading.
    top_level = {}
    for name, (_, tree) in modules().items():
        body = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                          type_ignores=[])
        top_level[name] = imports(name, body, set(graph)) & set(graph)
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in top_level.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError(" -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in top_level:
        if name not in state:
            visit(name, [name])


def test_the_root_holds_few_modules_and_none_is_long(graph):
    root = [m for m in graph if "." not in m]
    assert len(root) <= MAX_ROOT_MODULES, sorted(root)
    assert {m.split(".")[0] for m in graph if "." in m} >= set(LAYERS[1:-1])
    long = {name: n for name, (path, _) in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_functions_stay_short_and_take_few_arguments():
    """At most two functions over 8 parameters and two over 60 lines, package-wide."""
    many, long = [], []
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                count = (len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                         + bool(a.vararg) + bool(a.kwarg)
                         - bool(a.args and a.args[0].arg in ("self", "cls")))
                if count > 8:
                    many.append(f"{name}.{node.name}")
                if node.end_lineno - node.lineno >= 60:
                    long.append(f"{name}.{node.name}")
    assert len(many) <= 2, many
    assert len(long) <= 2, long

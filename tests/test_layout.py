"""The house rules, read from the code: what stays at the root, which folder may import which,
and the size of modules and functions (docs/layout.md)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a part imports only from the layers below its own (or within its own folder)
LAYERS = (("config", "ratings", "models", "inner_loop_optimizers"),
          ("dataloader", "options"),
          ("meta_learning",),
          ("run",),
          ("study",),
          ("report",),
          ("main", "train_original", "reproduce"))
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def project_modules():
    """{dotted name: path} of every module but the tests'."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in paths if path.parent.name != "tests"}


def imported(path):
    """The dotted names that ``path`` imports (``from a import b`` gives both a and a.b)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def part(module):
    """The part of the house a module belongs to: its folder, or itself at the root."""
    return module.split(".")[0]


def test_the_root_holds_what_a_user_runs_or_the_layout_names():
    root_modules = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(root_modules) <= 10, root_modules
    assert {f"{name}.py" for parts in LAYERS for name in parts if (ROOT / f"{name}.py").exists()} == set(root_modules)


def test_no_import_runs_back_up():
    modules = project_modules()
    upward = [f"{module} imports {name}" for module, path in modules.items() if part(module) in LAYER_OF
              for name in imported(path) if name in modules and part(name) != part(module)
              and LAYER_OF[part(name)] >= LAYER_OF[part(module)]]
    assert upward == []
    assert {part(module) for module in modules} - set(LAYER_OF) == {"benchmarks"}


def test_modules_and_functions_stay_short():
    too_long = []
    for module, path in project_modules().items():
        tree = ast.parse(path.read_text())
        if part(module) != "benchmarks" and len(path.read_text().splitlines()) > MAX_MODULE_LINES:
            too_long.append(module)
        too_long += [f"{module}.{node.name}" for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert too_long == []

"""The house's import structure: no module of fixnorm may import itself back through others.

Every import counts (module level and inside functions: a lazy import still runs), except those under
``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``: those are edges too,
except to the importing module's own packages, which were initialised before it ran.
"""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Modules of fixnorm that running ``path`` imports (with the packages whose __init__ runs on the way)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b, a.b.c
            candidate = ".".join(parts[:i])
            if candidate in known:
                found.add(candidate)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                add(target)
                for alias in child.names:  # from . import lawn: a submodule
                    add(f"{target}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    # a module's own packages were initialised before it started: reaching them again is no new import
    parts = name.split(".")
    return found - {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_graph() -> dict[str, set[str]]:
    files = sorted((SRC / "fixnorm").rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return result


def test_the_walker_sees_a_cycle_through_a_package_init():
    """The checker itself: a -> b.c runs b/__init__, which imports a."""
    graph = {"a": {"b", "b.c"}, "b": {"a"}, "b.c": set()}
    assert cycles(graph) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_fixnorm():
    found = cycles(import_graph())
    assert not found, "import cycles (each line one cycle):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_core_and_hooks_import_nothing_from_the_engine():
    graph = import_graph()
    for leaf in ("fixnorm.roles", "fixnorm.constraints", "fixnorm.optim", "fixnorm.hooks", "fixnorm.report"):
        assert not {m for m in graph.get(leaf, ()) if m.startswith("fixnorm.train")}, leaf


def test_the_method_example_in_docs_architecture_trains(tmp_path):
    """The docs' one-file method, run as written: registered, trained through the engine from its settings."""
    import re

    import pytest

    from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
    from fixnorm.methods import list_methods
    from fixnorm.train import load_recipe, make_config, train

    if not DEFAULT_FASHION_MNIST_DIR.exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    code = re.search(r"<!-- example: method -->\n```python\n(.*?)```", text, re.S).group(1)
    if "flooding" not in list_methods():
        exec(compile(code, "docs/architecture.md", "exec"), {})
    import torch

    from fixnorm.train import load_checkpoint

    tiny = dict(load_recipe("fmnist-smoke"), epochs=1, train_subset=1000, holdout=500, threads=1)
    runs = {}
    for name, settings in {"sgd": {"method": "sgd"},
                           "level0": {"method": "flooding", "method_kwargs": {"flooding": {"level": 0.0}}},
                           "level5": {"method": "flooding", "method_kwargs": {"flooding": {"level": 5.0}}}}.items():
        train(make_config(tiny, settings), tmp_path / name)
        runs[name] = load_checkpoint(tmp_path / name / "last.pt")
    # flood level 0 is the plain loss: the same weights as SGD, bit for bit; above the loss, training ascends
    for key, value in runs["sgd"]["model"].items():
        assert torch.equal(value, runs["level0"]["model"][key]), key
    assert runs["level5"]["history"][-1]["train_loss"] > runs["sgd"]["history"][-1]["train_loss"] + 0.5

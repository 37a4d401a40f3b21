"""The package's import graph has no cycle, and no module imports another's private names."""

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "precsearch"


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported module, names) for every precsearch import, lazy ones too."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = "precsearch." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("precsearch"):
                names = [alias.name for alias in node.names]
                if node.module == "precsearch":  # `from precsearch import batches` names modules
                    for name in names:
                        found.append((module, f"precsearch.{name}", []))
                else:
                    found.append((module, node.module, names))
            elif isinstance(node, ast.Import):
                found += [(module, alias.name, []) for alias in node.names if alias.name.startswith("precsearch.")]
    return found


def test_the_import_graph_has_no_cycle():
    graph = nx.DiGraph()
    for source, target, _ in _imports():
        if source != target and target != "precsearch" and (PACKAGE.parent / (target.replace(".", "/") + ".py")).exists():
            graph.add_edge(source, target)
    assert graph.number_of_edges() > 30
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_across_modules():
    private = [(source, target, name) for source, target, names in _imports() for name in names
               if name.startswith("_")]
    assert not private

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


LAYERS = ["precsearch.runtime", "precsearch.search", "precsearch.report"]  # each may import only those before it


def _layer(module: str) -> int:
    """0 runtime, 1 search, 2 report, 3 the package's top (``precsearch``, the CLI, the examples)."""
    return next((rank for rank, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")),
                len(LAYERS))


def test_no_module_imports_a_layer_above_its_own():
    upward = [(source, target) for source, target, _ in _imports() if _layer(target) > _layer(source)]
    assert {_layer(source) for source, _, _ in _imports()} == {0, 1, 2, 3}
    assert not upward, f"imports upward: {upward}"


def test_the_runtime_works_without_the_search_extra(tmp_path):
    """Load, apply and audit a plan with optuna, pandas and matplotlib impossible to import."""
    import subprocess
    import sys

    script = f'''
import sys
BLOCKED = {{"optuna", "pandas", "matplotlib", "sqlalchemy"}}  # networkx comes with torch

class Block:
    """Finds the blocked packages (no origin, as if missing) and fails to load them."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            import importlib.machinery
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Block())
import pkgutil, importlib, torch
import precsearch, precsearch.runtime
for info in pkgutil.iter_modules(precsearch.runtime.__path__, "precsearch.runtime."):
    importlib.import_module(info.name)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
plan = precsearch.Plan(layers={{"0": "bf16", "2": "fp32"}}).for_model(model)
plan.save({str(tmp_path / "plan.yaml")!r})
with precsearch.apply_plan(model, precsearch.load_plan({str(tmp_path / "plan.yaml")!r})):
    model(torch.randn(4, 8))
report = precsearch.audit(model, precsearch.load_plan({str(tmp_path / "plan.yaml")!r}), [torch.randn(4, 8)])
assert report.ok, report
try:
    precsearch.optimize
except ModuleNotFoundError as error:
    assert "precsearch[search]" in str(error), error
else:
    raise AssertionError("optimize imported with optuna blocked")
assert not BLOCKED & {{name.split(".")[0] for name, module in sys.modules.items() if module is not None}}
print("ok")
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

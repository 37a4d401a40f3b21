"""precsearch: per-layer precision search for PyTorch models.

>>> import precsearch
>>> graph = precsearch.walk(model, example_batch)                          # doctest: +SKIP
>>> result = precsearch.optimize(model, batches, precsearch.SearchConfig(max_error=0.01))  # doctest: +SKIP
>>> with precsearch.apply_plan(model, precsearch.load_plan("plan.yaml")):   # doctest: +SKIP
...     outputs = model(batch)

The runtime names (plans, the applier, the audit, the errors) need torch and pyyaml only; the
search's and the reports' names load on first use and need ``pip install 'precsearch[search]'``.
"""

from typing import Any

from precsearch.runtime.apply import PlanHandle, apply_plan
from precsearch.runtime.audit import AuditReport, audit
from precsearch.runtime.errors import InputError, PlanError, PrecsearchError
from precsearch.runtime.plan import LossScaling, Plan, load_plan, model_fingerprint
from precsearch.runtime.plan_sections import Constraint, PlanMetrics

__version__ = "0.1.0"

__all__ = [
    "AuditReport", "CheckResult", "Constraint", "InputError", "LayerGraph", "LossScaling", "Plan", "PlanError",
    "PlanHandle", "PlanMetrics", "PrecsearchError", "SearchConfig", "SearchResult", "SearchSpace", "apply_plan",
    "audit", "check", "load_plan", "model_fingerprint", "optimize", "walk",
]

_LAZY = {"optimize": "precsearch.search.loop", "SearchResult": "precsearch.search.loop",
         "SearchSpace": "precsearch.search.space", "SearchConfig": "precsearch.search.config",
         "walk": "precsearch.search.graph", "LayerGraph": "precsearch.search.graph",
         "check": "precsearch.search.check", "CheckResult": "precsearch.search.check"}


def __getattr__(name: str) -> Any:
    """The search's names need its extra (Optuna, networkx, pandas): import them only when asked for."""
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(f"precsearch.{name} needs the search extra: pip install 'precsearch[search]' "
                                      f"({error.name} is missing)", name=error.name) from error
        return getattr(module, name)
    raise AttributeError(f"module 'precsearch' has no attribute {name!r}")

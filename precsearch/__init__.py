"""precsearch: per-layer precision search for PyTorch models.

>>> import precsearch
>>> graph = precsearch.walk(model, example_batch)                          # doctest: +SKIP
>>> result = precsearch.optimize(model, batches, precsearch.SearchConfig(max_error=0.01))  # doctest: +SKIP
>>> with precsearch.apply_plan(model, precsearch.load_plan("plan.yaml")):   # doctest: +SKIP
...     outputs = model(batch)
"""

from typing import Any

from precsearch.audit import AuditReport, audit
from precsearch.errors import InputError, PlanError
from precsearch.graph import LayerGraph, walk
from precsearch.plan import LossScaling, Plan, load_plan, model_fingerprint
from precsearch.runtime import PlanHandle, apply_plan

__version__ = "0.1.0"

__all__ = [
    "AuditReport", "InputError", "LayerGraph", "LossScaling", "Plan", "PlanError", "PlanHandle",
    "SearchConfig", "SearchResult", "SearchSpace", "apply_plan", "audit", "load_plan", "model_fingerprint", "optimize", "walk",
]

_LAZY = {"optimize": "precsearch.search", "SearchResult": "precsearch.search", "SearchSpace": "precsearch.space",
         "SearchConfig": "precsearch.config"}


def __getattr__(name: str) -> Any:
    """The search pulls in Optuna and SQLAlchemy: import it only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'precsearch' has no attribute {name!r}")

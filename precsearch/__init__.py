"""precsearch: per-layer precision search for PyTorch models.

>>> import precsearch
>>> graph = precsearch.walk(model, example_batch)                    # doctest: +SKIP
>>> with precsearch.apply_plan(model, precsearch.load_plan("plan.yaml")):  # doctest: +SKIP
...     outputs = model(batch)
"""

from precsearch.errors import InputError, PlanError
from precsearch.graph import LayerGraph, walk
from precsearch.plan import LossScaling, Plan, load_plan, model_fingerprint
from precsearch.runtime import AuditReport, PlanHandle, apply_plan, audit

__version__ = "0.1.0"

__all__ = [
    "AuditReport", "InputError", "LayerGraph", "LossScaling", "Plan", "PlanError", "PlanHandle",
    "apply_plan", "audit", "load_plan", "model_fingerprint", "walk",
]

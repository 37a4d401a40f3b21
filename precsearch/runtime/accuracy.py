"""Fidelity of a candidate against the FP32 model: the built-in metrics (``METRICS``) and user metrics.

Every constraint is expressed as an *error* (lower is better) and a *limit*: a candidate is
feasible when ``error <= limit``. Non-finite outputs make the error ``inf``.

>>> fidelity = Fidelity.builtin(model, batches, "rel_l2", limit=0.01)   # doctest: +SKIP
>>> fidelity.error(model)       # with a plan applied: its rel_l2 against the cached FP32 outputs
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.errors import InputError
from precsearch.runtime.plan_sections import Constraint

REPEATABLE = 0.1    # two FP32 runs may differ by at most this fraction of the limit
ROUNDING = 1e-6     # ... or by this much, whatever the limit (run-to-run rounding)

Outputs = list[list[torch.Tensor]]   # per batch, the model's floating outputs (``run_outputs``)


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """All floating tensors in ``output`` (tensors, tuples, lists, dicts, dataclasses,
    transformers ``ModelOutput``), in order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in flatten_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in flatten_outputs(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for field in dataclasses.fields(output) for t in flatten_outputs(getattr(output, field.name))]
    return []


def run_outputs(model: nn.Module, batches: list[Any]) -> Outputs:
    """Outputs of ``model`` on every batch, flattened and detached."""
    with torch.no_grad():
        return [[t.detach() for t in flatten_outputs(_batches.call(model, batch))] for batch in batches]


def _pairs(outputs: Outputs, reference: Outputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for got_batch, ref_batch in zip(outputs, reference, strict=True):
        if len(got_batch) != len(ref_batch):
            raise RuntimeError("the model returned a different number of outputs than the FP32 reference")
        yield from zip(got_batch, ref_batch)


def rel_l2(outputs: Outputs, reference: Outputs) -> float:
    """``||y - y_ref|| / ||y_ref||`` over all outputs of all batches, in float64."""
    diff = ref = 0.0
    for got, want in _pairs(outputs, reference):
        got, want = got.double(), want.double()
        if not torch.isfinite(got).all():
            return math.inf
        diff += float((got - want).pow(2).sum())
        ref += float(want.pow(2).sum())
    return math.sqrt(diff) / math.sqrt(ref) if ref > 0 else (0.0 if diff == 0 else math.inf)


def cosine(outputs: Outputs, reference: Outputs) -> float:
    """``1 - mean over samples of cosine_similarity(y_i, y_ref_i)``."""
    similarities = []
    for got, want in _pairs(outputs, reference):
        got, want = got.double(), want.double()
        if not torch.isfinite(got).all():
            return math.inf
        rows = max(got.shape[0], 1) if got.dim() else 1
        similarities.append(torch.nn.functional.cosine_similarity(
            got.reshape(rows, -1), want.reshape(rows, -1), dim=1, eps=1e-12))
    return 1.0 - float(torch.cat(similarities).mean()) if similarities else 0.0


def max_abs(outputs: Outputs, reference: Outputs) -> float:
    """Largest absolute difference."""
    worst = 0.0
    for got, want in _pairs(outputs, reference):
        if not torch.isfinite(got).all():
            return math.inf
        worst = max(worst, float((got.double() - want.double()).abs().max()) if got.numel() else 0.0)
    return worst


def top1(outputs: Outputs, reference: Outputs) -> float:
    """``1 - agreement`` of the argmax of the last dimension."""
    agree = total = 0
    for got, want in _pairs(outputs, reference):
        if not torch.isfinite(got).all():
            return math.inf
        if got.dim() == 0:
            continue
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += got.argmax(-1).numel()
    return 1.0 - agree / total if total else 0.0


# Task metrics: the head's first floating output (logits, or the last hidden state) of each
# batch, read with the batch itself (its attention_mask, input_ids, and labels).

def _heads(outputs: Outputs, reference: Outputs,
           batches: list[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    for got_batch, ref_batch, batch in zip(outputs, reference, batches, strict=True):
        if not got_batch or len(got_batch) != len(ref_batch):
            raise RuntimeError("the model returned a different number of outputs than the FP32 reference")
        yield got_batch[0], ref_batch[0], batch


def _input(batch: Any, key: str) -> torch.Tensor | None:
    return batch.get(key) if isinstance(batch, Mapping) else None


def _positions(batch: Any, logits: torch.Tensor) -> torch.Tensor:
    """Which positions of ``logits`` (batch, length, classes) count: the attention_mask's, else all."""
    mask = _input(batch, "attention_mask")
    if mask is not None and mask.shape == logits.shape[:2]:
        return mask.bool()
    return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)


def token_agreement(outputs: Outputs, reference: Outputs, batches: list[Any]) -> float:
    """``1 - agreement`` of the predicted token (class) at every unpadded position."""
    agree = total = 0
    for got, want, batch in _heads(outputs, reference, batches):
        if not torch.isfinite(got).all():
            return math.inf
        keep = _positions(batch, got) if got.dim() == 3 else torch.ones(got.shape[:-1], dtype=torch.bool)
        agree += int(((got.argmax(-1) == want.argmax(-1)) & keep.to(got.device)).sum())
        total += int(keep.sum())
    return 1.0 - agree / total if total else 0.0


def _mean_nll(logits: torch.Tensor, batch: Any) -> tuple[float, int]:
    """Summed negative log-likelihood of the batch's own tokens, and how many: a causal LM
    predicts token t + 1 at position t; a seq2seq decoder reading the input shifted right, token t."""
    ids = _input(batch, "input_ids")
    if ids is None or logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise InputError("--metric-name perplexity: needs a language model's logits on token batches "
                         "(dicts with input_ids), e.g. --model hf:DIR --data FILE")
    keep = _positions(batch, logits)
    if _input(batch, "decoder_input_ids") is None:
        logits, ids, keep = logits[:, :-1], ids[:, 1:], keep[:, 1:] & keep[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), ids.flatten(), reduction="none")
    return float(nll[keep.flatten()].sum()), int(keep.sum())


def _perplexity(logits_per_batch: list[torch.Tensor], batches: list[Any]) -> float:
    nll, count = 0.0, 0
    for logits, batch in zip(logits_per_batch, batches, strict=True):
        batch_nll, batch_count = _mean_nll(logits, batch)
        nll, count = nll + batch_nll, count + batch_count
    if not count:
        raise InputError("--metric-name perplexity: the batches have no token to predict (give longer texts)")
    return math.exp(nll / count) if nll / count < 700 else math.inf


def perplexity(outputs: Outputs, reference: Outputs, batches: list[Any]) -> float:
    """``|ppl / ppl_fp32 - 1|``: the relative change of the perplexity on the batches' own tokens."""
    got = [g for g, _, _ in _heads(outputs, reference, batches)]
    if not all(torch.isfinite(g).all() for g in got):
        return math.inf
    fp32 = perplexity_value(reference, batches)
    return abs(_perplexity(got, batches) / fp32 - 1.0)


def perplexity_value(reference: Outputs, batches: list[Any]) -> float:
    """The FP32 model's perplexity on the batches' own tokens."""
    return _perplexity([batch[0] for batch in reference], batches)


def _labels(batches: list[Any]) -> list[torch.Tensor]:
    labels = [getattr(batch, "labels", None) for batch in batches]
    if any(label is None for label in labels):
        raise InputError("--metric-name label_accuracy: needs labels: give every example of --data FILE a "
                         "'label' (a classification checkpoint) or 'labels' (token classification), or use "
                         "top1")
    return [label for label in labels if label is not None]


def _accuracy(logits_per_batch: list[torch.Tensor], batches: list[Any]) -> float:
    """The fraction of scored labels the argmax predicts; a negative label (-100) scores nothing."""
    labels = _labels(batches)
    correct = scored = 0
    for logits, label in zip(logits_per_batch, labels, strict=True):
        label = label.to(logits.device)
        correct += int(((logits.argmax(-1) == label) & (label >= 0)).sum())
        scored += int((label >= 0).sum())
    return correct / max(scored, 1)


def label_accuracy(outputs: Outputs, reference: Outputs, batches: list[Any]) -> float:
    """The drop of label accuracy against FP32's (0 when it is not lower)."""
    got = [g for g, _, _ in _heads(outputs, reference, batches)]
    if not all(torch.isfinite(g).all() for g in got):
        return math.inf
    return max(0.0, label_accuracy_value(reference, batches) - _accuracy(got, batches))


def label_accuracy_value(reference: Outputs, batches: list[Any]) -> float:
    """The FP32 model's label accuracy."""
    return _accuracy([batch[0] for batch in reference], batches)


def embedding_cosine(outputs: Outputs, reference: Outputs, batches: list[Any]) -> float:
    """``1 - mean cosine similarity`` of each sample's embedding: its hidden states averaged
    over its unpadded positions (or the output itself when it is one vector a sample)."""
    similarities = []
    for got, want, batch in _heads(outputs, reference, batches):
        if not torch.isfinite(got).all():
            return math.inf
        got, want = got.double(), want.double()
        if got.dim() == 3:
            weights = _positions(batch, got).unsqueeze(-1).double()
            got = (got * weights).sum(1) / weights.sum(1).clamp_min(1)
            want = (want * weights).sum(1) / weights.sum(1).clamp_min(1)
        similarities.append(torch.nn.functional.cosine_similarity(
            got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1), dim=1, eps=1e-12))
    return 1.0 - float(torch.cat(similarities).mean()) if similarities else 0.0


@dataclasses.dataclass(frozen=True)
class Metric:
    """A built-in fidelity metric: an error of a candidate's outputs against the FP32 reference.

    A task metric also reads the batches (``uses_batches``: called with ``batches=``), and may
    have a value of its own for the FP32 model (``fp32_value``: an accuracy, a perplexity)."""

    name: str
    function: Callable[..., float]
    help: str
    uses_batches: bool = False
    fp32_value: Callable[[Outputs, list[Any]], float] | None = None

    def bound(self, batches: list[Any]) -> Callable[[Any, Any], float]:
        """``function(outputs, reference)`` for ``batches``."""
        if not self.uses_batches:
            return self.function
        return lambda outputs, reference: self.function(outputs, reference, batches=batches)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("rel_l2", rel_l2, "relative L2 error of all outputs"),
    Metric("cosine", cosine, "1 - mean cosine similarity per sample"),
    Metric("max_abs", max_abs, "largest absolute difference"),
    Metric("top1", top1, "1 - argmax agreement"),
    Metric("label_accuracy", label_accuracy, "drop of label accuracy (classifiers, data with labels)",
           uses_batches=True, fp32_value=label_accuracy_value),
    Metric("token_agreement", token_agreement, "1 - agreement of the predicted token at unpadded positions",
           uses_batches=True),
    Metric("perplexity", perplexity, "relative change of the perplexity (language models)",
           uses_batches=True, fp32_value=perplexity_value),
    Metric("embedding_cosine", embedding_cosine, "1 - mean cosine of mean-pooled embeddings per sample",
           uses_batches=True),
)}

# The metric a checkpoint's task is judged by (see ``hf.TASKS``); a classifier (of sequences, images or
# tokens) whose data has labels: label_accuracy
TASK_METRICS = {"causal-lm": "perplexity", "seq2seq-lm": "token_agreement", "sequence-classification": "top1",
                "image-classification": "top1", "token-classification": "token_agreement",
                "feature-extraction": "embedding_cosine"}


def task_metric(task: str | None, batches: list[Any]) -> str:
    """The default metric for a model of ``task`` on ``batches`` (rel_l2 when the task is unknown)."""
    if task in ("sequence-classification", "image-classification", "token-classification") and batches \
            and all(getattr(batch, "labels", None) is not None for batch in batches):
        return "label_accuracy"
    return TASK_METRICS.get(task or "", "rel_l2")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A candidate judged: its metric's ``error`` and, under a gate (generation's agreement with
    FP32's tokens), the gate's value and why the candidate fails it."""

    error: float
    agreement: float | None = None
    failure: str | None = None

    @property
    def constrained(self) -> float:
        """The error the search ranks: ``inf`` (infeasible) when the gate fails."""
        return math.inf if self.failure else self.error


def builtin_metric(constraint: Constraint | None) -> str | None:
    """The metric of a plan's ``constraint`` when it is a built-in one (``METRICS``), which any
    process can measure against FP32 on its own; None for a user metric or no constraint."""
    return constraint.metric if constraint is not None and constraint.metric in METRICS else None


@dataclasses.dataclass
class Fidelity:
    """A constraint: how to measure a candidate's error, and the limit it must stay within.
    ``gate`` (``workload.TokenGate``): a second condition, generated tokens against FP32's; a
    candidate that fails it is infeasible whatever its error (``error`` is then ``inf``)."""

    name: str
    limit: float
    measure: Callable[[nn.Module], float]
    reference_value: float | None = None  # the FP32 model's own value (user metrics, accuracy, perplexity)
    gate: Any = None

    def judge(self, model: nn.Module) -> Verdict:
        value = float(self.measure(model))
        error = value if math.isfinite(value) else math.inf
        if self.gate is None:
            return Verdict(error)
        agreement = self.gate.agreement(model)
        return Verdict(error, agreement, self.gate.failure(agreement))

    def error(self, model: nn.Module) -> float:
        return self.judge(model).constrained

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "limit": self.limit, **(self.gate.describe() if self.gate is not None else {})}

    @classmethod
    def builtin(cls, model: nn.Module, batches: list[Any], metric: str = "rel_l2", limit: float = 0.01) -> Fidelity:
        """Compare against FP32 reference outputs computed once, now."""
        if metric not in METRICS:
            raise InputError(f"--metric-name {metric!r}: unknown metric; use one of {', '.join(METRICS)}")
        check_limit(limit, "--max-error")
        inputs = _batches.fingerprint(batches)
        reference = run_outputs(model, batches)
        check_reference(reference)
        definition = METRICS[metric]
        function = definition.bound(batches)
        check_repeatable(function(run_outputs(model, batches), reference), metric, limit,
                         inputs_changed=_batches.fingerprint(batches) != inputs)
        value = float(definition.fp32_value(reference, batches)) if definition.fp32_value else None
        return cls(metric, limit, lambda candidate: function(run_outputs(candidate, batches), reference),
                   value)

    @classmethod
    def of_constraint(cls, model: nn.Module, batches: list[Any],
                      constraint: Constraint | None) -> Fidelity:
        """A plan's ``constraint`` as a built-in fidelity against FP32: its metric when built in, else
        rel_l2; its limit, or None (unchecked) when the plan states none for that metric."""
        builtin = builtin_metric(constraint)
        metric = builtin or "rel_l2"
        limit = constraint.limit if constraint is not None and builtin else None
        unchecked = cls.builtin(model, batches, metric, 0.0)
        return dataclasses.replace(unchecked, limit=limit)  # type: ignore[arg-type]

    @classmethod
    def user(cls, model: nn.Module, batches: list[Any], function: Callable[[nn.Module, list[Any]], float],
             name: str, *, max_drop: float | None = None, max_rel_drop: float | None = None) -> Fidelity:
        """A user metric, higher is better, bounded by its drop against the FP32 model."""
        if (max_drop is None) == (max_rel_drop is None):
            raise InputError(f"--metric {name}: give exactly one of --max-drop or --max-rel-drop")
        limit = check_limit(max_drop if max_drop is not None else max_rel_drop,
                             "--max-drop" if max_drop is not None else "--max-rel-drop")
        with torch.no_grad():
            reference_value = _call_user_metric(function, model, batches, name)
        if not math.isfinite(reference_value):
            raise InputError(f"--metric {name}: the FP32 model scores {reference_value}, not a finite number")

        def drop(candidate: nn.Module) -> float:
            with torch.no_grad():
                value = _call_user_metric(function, candidate, batches, name)
            if not math.isfinite(value):
                return math.inf
            absolute = reference_value - value
            return absolute if max_drop is not None else absolute / max(abs(reference_value), 1e-12)

        label = f"{name} drop" if max_drop is not None else f"{name} relative drop"
        return cls(label, limit, drop, reference_value)


def check_reference(reference: Outputs) -> None:
    """FP32 outputs a plan can be compared with: floating, not empty, finite."""
    if not any(reference):
        raise InputError("the model returned no floating-point tensor to compare")
    if not any(t.numel() for batch in reference for t in batch):
        raise InputError("the model's floating-point outputs on --data are empty (zero elements): "
                         "there is nothing to compare; give batches with at least one sample")
    if not all(torch.isfinite(t).all() for batch in reference for t in batch):
        raise InputError("the FP32 model's own outputs are not finite (NaN or inf) on the given data: "
                         "no plan can be compared with them; check the model and --data")


def check_repeatable(rerun_error: float, metric: str, limit: float, inputs_changed: bool) -> None:
    """The FP32 model run twice on the same data must agree, or every plan's error is noise.

    Exact agreement is not asked: run-to-run rounding (atomic reductions on a GPU) stays far
    below any limit. More than ``REPEATABLE`` of the limit (and more than ``ROUNDING``) between
    two FP32 runs is refused, naming the likely cause: the inputs changed in place, or
    randomness (dropout in train mode)."""
    if rerun_error <= max(limit * REPEATABLE, ROUNDING):
        return
    cause = ("it changes its inputs in place (the batches differ after one run): clone them inside forward"
             if inputs_changed else
             "it is random (dropout or sampling in train mode?): call model.eval() and seed or remove the randomness")
    raise InputError(f"the FP32 model gives different outputs on two identical runs ({metric} {rerun_error:.3g} "
                     f"between them, limit {limit:g}): {cause}")


def _call_user_metric(function: Callable[[nn.Module, list[Any]], float], model: nn.Module,
                      batches: list[Any], name: str) -> float:
    value = function(model, batches)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"--metric {name}: returned {type(value).__name__}, not a number") from None


def check_limit(limit: object, flag: str) -> float:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
        raise InputError(f"{flag} {limit!r}: must be a finite number >= 0")
    return float(limit)

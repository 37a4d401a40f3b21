"""What a study stores, declared once: the setup every worker and the report share, each trial's
measurement, and the workers' bookkeeping. Nothing else reads or writes Optuna ``user_attrs``.

>>> record = TrialRecord.of(study.trials[0])       # doctest: +SKIP
>>> record.plan, record.speedup                     # doctest: +SKIP
('bbf', 1.42)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optuna

T = TypeVar("T")


# -- the study's setup --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """How a search was run: what the report and a refused worker's message describe."""

    model: str
    space: str
    mode: str
    constraint: dict[str, Any]   # {"metric": name, "limit": number, + memory.MemoryBudget.describe()}
    device: str
    device_name: str
    torch: str
    trials: int
    seed: int
    strategy: str
    sampler: str
    parametrisation: str
    weights: str | None = None   # runtime.weights the candidates were measured with (None: older studies)

    def describe(self) -> str:
        from precsearch.runtime.memory import MemoryBudget

        budget = MemoryBudget.of(self.constraint).text()
        return (f"model {self.model}, space {self.space}, {self.constraint['metric']} <= "
                f"{self.constraint['limit']}{', ' + budget if budget else ''}, mode {self.mode}")


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """Computed once per study by the worker that created it; the other workers wait for it."""

    settings: Settings
    fingerprint: str                                   # refuses workers with another model, space, ...
    units: list[dict[str, Any]]                        # name, type, params, flops; in execution order
    edges: list[list[str]]
    sensitivity: dict[str, dict[str, float | None]]    # unit -> dtype -> error with only it lowered
    dtype_probe: dict[str, dict[str, float | None]]    # dtype -> relative_latency, error_gain
    baseline_ms: float                                 # the FP32 model's latency at setup
    weight_mb: float | None = None                     # the FP32 model's weights
    noise: float | None = None                         # FP32 against itself: relative half-width
    ties: dict[str, str] = dataclasses.field(default_factory=dict)  # unit -> unit it must share a precision with
    data: str | None = None                            # fingerprint of the batches (``batches.fingerprint``)

    def save(self, study: optuna.Study) -> None:
        """Store every field, then mark the study ready: waiting workers never see half a setup."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            study.set_user_attr(field.name, dataclasses.asdict(value) if field.name == "settings" else value)
        study.set_user_attr("ready", True)

    @classmethod
    def load(cls, study: optuna.Study) -> StudySetup | None:
        """The setup, or None while it is not finished (or the study was not made by precsearch)."""
        attrs = study.user_attrs
        if not attrs.get("ready"):
            return None
        values = {field.name: attrs[field.name] if field.name in attrs or _required(field)
                  else _default(field) for field in dataclasses.fields(cls)}
        values["settings"] = Settings(**values["settings"])
        return cls(**values)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def claim_setup(study: optuna.Study, worker: str) -> None:
    study.set_user_attr("setup_by", worker)


def setup_owner(study: optuna.Study) -> str | None:
    return study.user_attrs.get("setup_by")


def save_diagnostics(study: optuna.Study, diagnostics: dict[str, Any]) -> None:
    study.set_user_attr("training_diagnostics", diagnostics)


def load_diagnostics(study: optuna.Study) -> dict[str, Any] | None:
    return study.user_attrs.get("training_diagnostics")


# -- one trial ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One candidate's measurement, as stored on its trial."""

    plan: str                      # one letter per unit (``decisions.encode``)
    error: float | None            # None: non-finite outputs
    latency_ms: float              # median, this trial
    baseline_ms: float             # FP32 median, interleaved with it
    peak_memory_mb: float | None = None
    failure: str | None = None     # why the candidate could not run
    weight_mb: float | None = None  # the model's weights while the candidate ran
    speedup_low: float | None = None   # the speedup's 95% confidence interval
    speedup_high: float | None = None
    # --workload generate (``workload.GenerationStats.record``): this trial's own medians
    prefill_ms: float | None = None
    decode_ms_per_token: float | None = None
    tokens_per_s: float | None = None
    generated_tokens: int | None = None
    token_agreement: float | None = None   # share of greedy tokens equal to FP32's, all batches

    @property
    def generation(self) -> Any:
        """The trial's ``workload.GenerationStats``, None when it did not generate."""
        from precsearch.runtime.workload import GenerationStats

        return GenerationStats.of(dataclasses.asdict(self))

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms or not math.isfinite(self.latency_ms) or not math.isfinite(self.baseline_ms):
            return None
        return self.baseline_ms / self.latency_ms

    def save(self, trial: optuna.Trial) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None or field.name == "error":
                trial.set_user_attr(field.name, value)

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial) -> TrialRecord | None:
        """The trial's record, or None for a trial that measured nothing (interrupted, surplus)."""
        attrs = trial.user_attrs
        if "plan" not in attrs or "latency_ms" not in attrs:
            return None
        return cls(**{field.name: attrs.get(field.name) for field in dataclasses.fields(cls)})


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """A completed trial within every constraint (the error's and the memory budget's)."""
    return (trial.state == optuna.trial.TrialState.COMPLETE and "error" in trial.constraints
            and all(value <= 0 for value in trial.constraints.values()))


def violated(trial: optuna.trial.FrozenTrial) -> list[str]:
    """The names of the constraints ``trial`` violates (``error``, ``weight_mb``, ...)."""
    return [name for name, value in trial.constraints.items() if value > 0]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model-based prediction of a trial's plan (``proposal``), made before it was measured."""

    predicted_error: float
    predicted_speedup: float

    def save(self, trial: optuna.Trial) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            trial.set_user_attr(field.name, value if math.isfinite(value) else None)

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial) -> Prediction | None:
        values = [trial.user_attrs.get(field.name) for field in dataclasses.fields(cls)]
        return None if None in values else cls(*values)


def lead_marks(lead: str, plan: str) -> dict[str, str]:
    """The user_attrs of a trial the search enqueues itself (``lead``: ``greedy`` or ``proposal``),
    with its plan code: the ranked parametrisation cannot express every plan in its params."""
    return {"lead": lead, "lead_plan": plan}


def lead_of(trial: optuna.trial.FrozenTrial) -> tuple[str, str] | None:
    """``(lead, plan code)`` of a trial the search enqueued itself, else None."""
    attrs = trial.user_attrs
    return (attrs["lead"], attrs["lead_plan"]) if "lead" in attrs and "lead_plan" in attrs else None


def mark_worker(trial: optuna.Trial, worker: str) -> None:
    trial.set_user_attr("worker", worker)


def worker_of(trial: optuna.trial.FrozenTrial) -> str | None:
    return trial.user_attrs.get("worker")


def mark_surplus(trial: optuna.Trial) -> None:
    trial.set_user_attr("surplus", True)


def is_surplus(trial: optuna.trial.FrozenTrial) -> bool:
    return bool(trial.user_attrs.get("surplus"))


def retry_marks(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The user_attrs a re-queued copy of ``trial`` starts with."""
    return {"retry_of": trial.number}


# -- the trade-off --------------------------------------------------------------------------------
def pareto_front(points: Sequence[T], key: Callable[[T], tuple[float, float]]) -> list[T]:
    """The points no other point beats in both ``key`` values (latency, error), lowest latency
    first; of equal points, the first one.

    The one definition used by the search, the report, the plots and the tests. The FP32 plan
    (error 0) is a point like any other: it is on the front unless a plan as fast has no error.
    """
    front: list[T] = []
    best_error = math.inf
    for point in sorted(points, key=key):
        latency, error = key(point)
        if error < best_error:
            front.append(point)
            best_error = error
    return front

"""What a study stores, declared once: the setup every worker and the report share, each trial's
measurement, and the workers' bookkeeping. Nothing else reads or writes Optuna ``user_attrs``.

>>> record = TrialRecord.of(study.trials[0], setup.unit_names)   # doctest: +SKIP
>>> record.layers, record.code, record.speedup                  # doctest: +SKIP
({'0': 'bf16', '1': 'bf16', '2': 'fp32'}, 'bbf', 1.42)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import optuna

from precsearch.runtime.plan_sections import Constraint
from precsearch.runtime.training import Diagnostics
from precsearch.search.decisions import decode, encode

T = TypeVar("T")


# -- the study's setup --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """How a search was run: what the report and a refused worker's message describe."""

    model: str
    space: str
    mode: str
    constraint: Constraint       # a mapping given here (as a study stores it) is parsed into one
    device: str
    device_name: str
    torch: str
    trials: int
    seed: int
    strategy: str
    sampler: str
    parametrisation: str
    weights: str | None = None   # runtime.weights the candidates were measured with (None: older studies)

    def __post_init__(self) -> None:
        object.__setattr__(self, "constraint", Constraint.of(self.constraint))

    def to_dict(self) -> dict[str, Any]:
        """As a study's ``settings`` user attribute stores it."""
        return {**dataclasses.asdict(self), "constraint": self.constraint.to_dict()}

    def describe(self) -> str:
        from precsearch.runtime.memory import MemoryBudget

        budget = MemoryBudget.of(self.constraint).text()
        return (f"model {self.model}, space {self.space}, {self.constraint.metric} <= "
                f"{self.constraint.limit}{', ' + budget if budget else ''}, mode {self.mode}")


@dataclasses.dataclass(frozen=True)
class DtypeProbe:
    """One low precision's probe plan (every unit that allows it in it) measured once:
    ``relative_latency`` against FP32 with the speedup's interval (None in studies made before
    it was recorded), and ``error_gain``, its error over the one sensitivity predicts (None when
    either is not finite)."""

    relative_latency: float
    speedup_low: float | None = None
    speedup_high: float | None = None
    error_gain: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """As a study's ``dtype_probe`` user attribute stores it."""
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, value: DtypeProbe | dict[str, Any]) -> DtypeProbe:
        """``value`` as a DtypeProbe: a stored mapping is parsed, a DtypeProbe kept."""
        return value if isinstance(value, DtypeProbe) else cls(**value)


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """Computed once per study by the worker that created it; the other workers wait for it."""

    settings: Settings
    fingerprint: str                                   # refuses workers with another model, space, ...
    units: list[dict[str, Any]]                        # name, type, params, flops; in execution order
    edges: list[list[str]]
    sensitivity: dict[str, dict[str, float | None]]    # unit -> dtype -> error with only it lowered
    dtype_probe: dict[str, DtypeProbe]                 # dtype -> its probe (stored mappings are parsed)
    baseline_ms: float                                 # the FP32 model's latency at setup
    weight_mb: float | None = None                     # the FP32 model's weights
    noise: float | None = None                         # FP32 against itself: relative half-width
    ties: dict[str, str] = dataclasses.field(default_factory=dict)  # unit -> unit it must share a precision with
    data: str | None = None                            # fingerprint of the batches (``batches.fingerprint``)

    def __post_init__(self) -> None:
        probes = {dtype: DtypeProbe.of(probe) for dtype, probe in self.dtype_probe.items()}
        object.__setattr__(self, "dtype_probe", probes)

    def save(self, study: optuna.Study) -> None:
        """Store every field, then mark the study ready: waiting workers never see half a setup."""
        for field in dataclasses.fields(self):
            study.set_user_attr(field.name, self._stored(field.name))
        study.set_user_attr("ready", True)

    def _stored(self, name: str) -> Any:
        """A field as its user attribute holds it: records become mappings."""
        if name == "settings":
            return self.settings.to_dict()
        if name == "dtype_probe":
            return {dtype: probe.to_dict() for dtype, probe in self.dtype_probe.items()}
        return getattr(self, name)

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

    @property
    def unit_names(self) -> list[str]:
        """The units in execution order: what a trial's plan code is read over."""
        return [unit["name"] for unit in self.units]


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def claim_setup(study: optuna.Study, worker: str) -> None:
    study.set_user_attr("setup_by", worker)


def setup_owner(study: optuna.Study) -> str | None:
    return study.user_attrs.get("setup_by")


def save_diagnostics(study: optuna.Study, diagnostics: Diagnostics) -> None:
    study.set_user_attr("training_diagnostics", diagnostics.to_dict())


def load_diagnostics(study: optuna.Study) -> Diagnostics | None:
    stored = study.user_attrs.get("training_diagnostics")
    return Diagnostics.from_dict(stored) if stored is not None else None


# -- one trial ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One candidate's measurement, as stored on its trial. ``layers`` holds every unit's dtype
    in execution order; the trial stores it as its ``code`` (the ``plan`` user attribute)."""

    layers: Mapping[str, str]      # unit -> dtype, every unit
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

    @property
    def code(self) -> str:
        """The plan as one letter per unit (``decisions.encode``): how the trial stores it, and
        trials.csv's ``plan`` column."""
        return encode(self.layers, list(self.layers))

    def user_attrs(self) -> dict[str, Any]:
        """The record as its trial stores it: the plan's code, and the measurements taken."""
        measured = {field.name: getattr(self, field.name) for field in _MEASURED}
        return {PLAN_ATTR: self.code, **{name: value for name, value in measured.items()
                                         if value is not None or name == "error"}}

    def save(self, trial: optuna.Trial) -> None:
        for name, value in self.user_attrs().items():
            trial.set_user_attr(name, value)

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial, units: Sequence[str]) -> TrialRecord | None:
        """The trial's record, its plan read over ``units`` (the study's, in execution order), or
        None for a trial that measured nothing (interrupted, surplus)."""
        attrs = trial.user_attrs
        if PLAN_ATTR not in attrs or "latency_ms" not in attrs:
            return None
        measured: dict[str, Any] = {field.name: attrs.get(field.name) for field in _MEASURED}
        return cls(decode(attrs[PLAN_ATTR], list(units)), **measured)


PLAN_ATTR = "plan"   # the trial's user attribute holding ``TrialRecord.code``
_MEASURED = [field for field in dataclasses.fields(TrialRecord) if field.name != "layers"]


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
        values: list[Any] = [trial.user_attrs.get(field.name) for field in dataclasses.fields(cls)]
        return None if None in values else cls(*values)


def lead_marks(lead: str, plan: str) -> dict[str, str]:
    """The user_attrs of a trial the search enqueues itself (``lead``: ``greedy`` or ``proposal``),
    with its plan code: the ranked parametrisation cannot express every plan in its params."""
    return {"lead": lead, "lead_plan": plan}


def lead_of(trial: optuna.trial.FrozenTrial | optuna.Trial) -> tuple[str, str] | None:
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

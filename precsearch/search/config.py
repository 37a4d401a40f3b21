"""How to search, as one frozen, validated value: ``optimize(model, batches, SearchConfig(...))``.

>>> config = SearchConfig.from_names(space="transformer", max_error=0.005, trials=40)   # doctest: +SKIP
>>> config.space.name, config.strategy.name                                             # doctest: +SKIP
('transformer', 'optuna')

Every field is checked when the config is built, so an invalid search cannot start: bad input
raises ``InputError`` naming the command-line flag that sets the field. ``space`` and ``strategy``
hold resolved ``SearchSpace`` and ``Strategy`` objects; ``from_names`` resolves names and paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from precsearch.runtime.accuracy import METRICS, Fidelity, check_limit
from precsearch.runtime.errors import InputError, PlanError
from precsearch.runtime.memory import MemoryBudget
from precsearch.runtime.plan import MODES, Runtime
from precsearch.runtime.plan_sections import Constraint
from precsearch.runtime.precisions import PRECISIONS
from precsearch.search.space import SearchSpace
from precsearch.search.storage import HEARTBEAT_S
from precsearch.search.strategies import DEFAULT_STRATEGY, Strategy, named_strategy

MAX_CATEGORICAL = 48   # above this many choices, the study searches a ranked parametrisation
REPEATS = 15           # at most this many timed rounds per feasible candidate (fewer once its interval is tight)
MODE_ALIASES = {"infer": "inference", "train": "training"}
AUTO_HOLDOUT = 0.25            # held out by default once there are AUTO_HOLDOUT_MIN_BATCHES batches or more
AUTO_HOLDOUT_MIN_BATCHES = 8   # fewer: every batch goes to the search (see ``SearchConfig``)
DEFAULT_SPACE = "default"


def _default_space() -> SearchSpace:
    return SearchSpace.load(DEFAULT_SPACE)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A search: what to optimise under which constraint, with which budget and storage.

    ``space`` and ``strategy`` are objects (``SearchSpace.load``, ``STRATEGIES``); to give them
    by name or path, build the config with ``SearchConfig.from_names``.
    ``fidelity`` overrides ``metric``/``max_error`` (e.g. ``Fidelity.user(...)`` for a task
    metric). ``mode="training"`` times full training steps on ``(inputs, target)`` batches and
    bounds the gradients' rel_l2 against FP32 (``loss_fn(output, target)``, default cross
    entropy). ``trials`` is the study's total budget over all workers and resumes.
    ``drop_slow_dtypes`` leaves out a low precision whose all-low plan ran clearly slower than FP32
    (under a ``max_weight_mb`` budget, which only low precisions can meet, the fastest one stays).

    Unseen data (inference, built-in metrics): ``holdout`` is the fraction of the batches kept
    from the search and used only to score the chosen and the Pareto plans (their
    ``holdout_error``); ``None`` holds out ``AUTO_HOLDOUT`` (a quarter) when there are at least
    ``AUTO_HOLDOUT_MIN_BATCHES`` batches, else none: with fewer batches each one carries much of
    the error the search decides on, and one or two held-out batches say little. ``holdout_data``
    gives the held-out batches instead. ``margin`` leaves headroom: the chosen plan is the fastest
    whose search error is at most ``max_error * (1 - margin)`` (default 0: the limit is yours).

    Memory budget (``precsearch.runtime.memory``), a second constraint beside the accuracy limit: a plan
    is feasible only when its weights as it runs (``metrics.weight_mb``, low weights held) take at
    most ``max_weight_mb`` MB (2**20 bytes), and, on CUDA, its peak memory at most ``max_peak_mb``.
    """

    space: SearchSpace = dataclasses.field(default_factory=_default_space)
    metric: str = "rel_l2"
    max_error: float = 0.01
    fidelity: Fidelity | None = None
    mode: str = "inference"
    loss_fn: Callable[[Any, Any], Any] | None = None
    trials: int = 60
    timeout: float | None = None
    storage: str | None = None
    study_name: str = "precsearch"
    seed: int = 0
    model_name: str | None = None
    progress: bool = True
    repeats: int = REPEATS
    max_categorical: int = MAX_CATEGORICAL
    drop_slow_dtypes: bool = True
    heartbeat: float = HEARTBEAT_S
    strategy: Strategy = named_strategy(DEFAULT_STRATEGY)
    weights: str | None = None     # "low" | "fp32"; None: low for inference, fp32 (master weights) for training
    compile: bool = False          # race the finalists compiled with torch.compile (inference)
    holdout: float | None = None   # fraction of the batches held out; None: AUTO_HOLDOUT from 8 batches on
    holdout_data: Sequence[Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    margin: float = 0.0            # choose within max_error * (1 - margin)
    max_weight_mb: float | None = None   # memory budget: the plan's weights as it runs, MB (2**20 bytes)
    max_peak_mb: float | None = None     # the device's peak memory while the plan runs (CUDA only)
    workload: str = "forward"      # what a timed run is: "forward", or "generate" (precsearch.runtime.workload)
    new_tokens: int | None = None  # generate: tokens each run generates (default 32)
    min_token_agreement: float | None = None   # generate: share of greedy tokens equal to FP32's (default 0.9)

    @classmethod
    def from_names(cls, space: SearchSpace | str = DEFAULT_SPACE, strategy: Strategy | str = DEFAULT_STRATEGY,
                   **fields: Any) -> SearchConfig:
        """The config with ``space`` (a named space or a YAML path) and ``strategy`` (a name in
        ``STRATEGIES``) resolved: ``SearchConfig.from_names(space="transformer", strategy="greedy")``."""
        return cls(space=SearchSpace.load(space) if isinstance(space, str) else space,
                   strategy=named_strategy(strategy) if isinstance(strategy, str) else strategy, **fields)

    def __post_init__(self) -> None:
        _check_resolved(self.space, "space", SearchSpace)
        _check_resolved(self.strategy, "strategy", Strategy)
        mode = MODE_ALIASES.get(self.mode, self.mode)
        if mode not in MODES:
            raise InputError(f"--mode {self.mode!r}: use inference (infer) or training (train)")
        object.__setattr__(self, "mode", mode)
        try:
            runtime = Runtime(weights=self.weights) if self.weights is not None else Runtime.default_for(mode)
        except PlanError as error:
            raise InputError(f"--weights {self.weights!r}: {error}") from None
        if mode == "training" and runtime.weights == "low":
            raise InputError("--weights low: training keeps FP32 master weights; use --weights fp32")
        object.__setattr__(self, "weights", runtime.weights)
        inference_only = [d for d in self.space.dtypes if PRECISIONS[d].inference_only]
        if mode == "training" and inference_only:
            raise InputError(f"--space {self.space.name}: {', '.join(inference_only)} runs in inference searches "
                             f"only; use a space without it for --mode train")
        if self.compile and mode == "training":
            raise InputError("--compile: compiled measurement is for inference searches; drop it with --mode train")
        if self.metric not in METRICS:
            raise InputError(f"--metric-name {self.metric!r}: use one of {', '.join(METRICS)}")
        check_limit(self.max_error, "--max-error")
        if self.loss_fn is not None and mode != "training":
            raise InputError("--loss applies to --mode train")
        _check_int(self.trials, "--trials", 1)
        _check_int(self.seed, "--seed", None)
        _check_int(self.repeats, "repeats", 1)
        _check_int(self.max_categorical, "max_categorical", 1)
        for flag, value in (("--timeout", self.timeout), ("--heartbeat", self.heartbeat)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{flag} {value!r}: must be a positive number of seconds")
        if not isinstance(self.study_name, str) or not self.study_name:
            raise InputError(f"--study {self.study_name!r}: must be a non-empty name")
        self._check_unseen_data()
        self._check_workload()
        if self.memory.max_weight_mb is not None and runtime.weights == "fp32":
            raise InputError(f"--max-weight-mb {self.max_weight_mb:g}: with FP32 weights (--weights fp32, or "
                             f"--mode train) every plan holds the same weights; use --weights low (inference)")

    def _check_workload(self) -> None:
        """``workload``, ``new_tokens`` and ``min_token_agreement``: generation is an inference
        workload, timed eager or compiled; the agreement is a fraction and needs generation."""
        from precsearch.runtime.workload import DEFAULT_MIN_TOKEN_AGREEMENT

        run = self.run   # checks the name and the token count
        object.__setattr__(self, "new_tokens", run.new_tokens)
        if not run.generates:
            if self.min_token_agreement is not None:
                raise InputError("--min-token-agreement: applies to --workload generate")
            return
        if self.training:
            raise InputError("--workload generate: generation is timed for inference; drop it with --mode train")
        agreement = DEFAULT_MIN_TOKEN_AGREEMENT if self.min_token_agreement is None else self.min_token_agreement
        if not (_is_real(agreement) and 0 <= agreement <= 1):
            raise InputError(f"--min-token-agreement {agreement!r}: must be a fraction from 0 to 1")
        object.__setattr__(self, "min_token_agreement", float(agreement))

    def _check_unseen_data(self) -> None:
        """``holdout``, ``holdout_data`` and ``margin``: numbers in range, one source of held-out batches."""
        from precsearch.runtime import batches as _batches
        if not (_is_real(self.margin) and 0 <= self.margin < 1):
            raise InputError(f"--margin {self.margin!r}: must be a number >= 0 and < 1 (a share of --max-error)")
        if self.holdout is not None and not (_is_real(self.holdout) and 0 <= self.holdout < 1):
            raise InputError(f"--holdout {self.holdout!r}: must be a fraction of the batches, >= 0 and < 1")
        if self.holdout_data is not None:
            if self.holdout:
                raise InputError("--holdout and --holdout-data: give one source of held-out batches, not both")
            try:
                object.__setattr__(self, "holdout_data", _batches.as_list(self.holdout_data))
            except InputError as error:
                raise InputError(f"--holdout-data: {error}") from None
        if (self.holdout or self.holdout_data is not None) and (self.training or self.fidelity is not None):
            flag = "--holdout-data" if self.holdout_data is not None else "--holdout"
            raise InputError(f"{flag}: held-out scoring works with the built-in metrics of inference searches "
                             f"(--metric-name); drop {flag} with --mode train or --metric M:F")

    def holdout_count(self, batches: int) -> int:
        """How many of ``batches`` batches are held out of the search: the fraction, rounded, at
        least one and never all (0 with ``holdout_data``, which brings its own)."""
        fraction = 0.0 if self.holdout_data is not None else self.holdout_fraction(batches)
        if not fraction:
            return 0
        if batches < 2:
            raise InputError(f"--holdout {fraction:g}: one batch cannot be split; give more batches or --holdout-data")
        return min(max(1, round(fraction * batches)), batches - 1)

    def holdout_fraction(self, batches: int) -> float:
        """The share of ``batches`` batches to hold out (``holdout``, or its default)."""
        if self.holdout is not None:
            return self.holdout
        automatic = batches >= AUTO_HOLDOUT_MIN_BATCHES and not self.training and self.fidelity is None
        return AUTO_HOLDOUT if automatic and self.holdout_data is None else 0.0

    @property
    def training(self) -> bool:
        return self.mode == "training"

    @property
    def memory(self) -> MemoryBudget:
        """The memory budget (validated: a positive finite number per limit set)."""
        return MemoryBudget(max_weight_mb=self.max_weight_mb, max_peak_mb=self.max_peak_mb)

    def constraint(self, fidelity: Fidelity) -> Constraint:
        """Every limit of the search, as a plan's and a study's ``constraint`` record it:
        ``{metric, limit}`` and the memory budget's fields when set."""
        return Constraint.from_dict({**fidelity.describe(), **self.memory.describe()})

    @property
    def runtime(self) -> Runtime:
        """How every candidate is measured: as it will be deployed."""
        assert self.weights is not None   # resolved in __post_init__
        return Runtime(weights=self.weights, compile=self.compile, **self.run.plan_fields())

    @property
    def run(self) -> Any:
        """The ``precsearch.runtime.workload.Workload`` every candidate is timed on."""
        from precsearch.runtime.workload import Workload

        return Workload(self.workload, self.new_tokens)


def _check_resolved(value: object, field: str, kind: type) -> None:
    """A ``space`` or ``strategy`` given by name to the plain constructor is a programming error."""
    if isinstance(value, kind):
        return
    hint = (f"; resolve it with SearchConfig.from_names({field}={value!r}, ...)" if isinstance(value, str)
            else "")
    raise TypeError(f"SearchConfig({field}={value!r}): {field} must be a {kind.__name__}{hint}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(value: object, flag: str, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InputError(f"{flag} {value!r}: must be an integer{bound}")

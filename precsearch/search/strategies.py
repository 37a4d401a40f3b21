"""Search strategies (``precsearch optimize --strategy``): Optuna's seeded TPE, and the reference
strategies it is compared with. ``STRATEGIES`` is the registry the CLI and the search read.

The procedural ones are generators: it yields per-unit plans and receives their measurements, and stops when
it has its answer. The study runs them like any other trials, so their plans, trials.csv and
report come out the same way.

- ``global``: one dtype for the whole model, the faster feasible of all-FP16 and all-BF16 (what
  ``torch.autocast`` around the model gives), else FP32.
- ``greedy``: all low precision, then units back to FP32 one at a time, most sensitive first,
  until the limit holds (Intel Neural Compressor's mixed-precision tuning).
- ``bisect``: bisection over the units in graph order for those that must stay FP32
  (Polygraphy's ``debug precision``, ONNX Runtime's ``auto_mixed_precision``).

``random`` (random plans), ``tpe`` (TPE from the sensitivity seeds alone) and ``optuna`` are
samplers, not generators; ``exhaustive`` tries every plan of a small model to establish the true
optimum for benchmarks.

The default, ``optuna``, starts from the cheap strategies' best plans (``Lead``): greedy's answer
(predicted from the sensitivities, then checked by measurement), then the model-based proposals
(``precsearch.search.proposal``) and the sensitivity seeds, all enqueued as its first trials; TPE spends
the rest of the budget improving on them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Generator

import optuna

from precsearch.search.decisions import Decisions, decode, encode
from precsearch.search.evaluate import Evaluator, Measurement
from precsearch.runtime.errors import InputError
from precsearch.runtime.precisions import AUTOCAST
from precsearch.search.proposal import FRONT, ErrorModel, LatencyModel, Observation, Proposal
from precsearch.search.trials import Prediction, TrialRecord, lead_marks, lead_of

Proposer = Generator[dict[str, str], Measurement, None]


def global_plans(decisions: Decisions, limit: float) -> Proposer:
    feasible = False
    for dtype in decisions.low:
        measured = yield decisions.expand({c.name: dtype for c in decisions.choices if dtype in c.dtypes})
        feasible |= measured.error <= limit
    if not feasible:
        yield decisions.expand({})


def greedy_plans(decisions: Decisions, limit: float) -> Proposer:
    dtype = decisions.preferred_low
    if dtype is None:
        yield decisions.expand({})
        return
    lowered = [c for c in decisions.choices if dtype in c.dtypes and len(c.dtypes) > 1]
    riskiest_first = sorted(lowered, key=lambda c: -decisions.errors[dtype][c.name])
    measured = yield decisions.expand({c.name: dtype for c in lowered})
    for choice in riskiest_first:
        if measured.error <= limit:
            return
        lowered.remove(choice)
        measured = yield decisions.expand({c.name: dtype for c in lowered})


def bisect_plans(decisions: Decisions, limit: float) -> Proposer:
    dtype = decisions.preferred_low
    if dtype is None:
        yield decisions.expand({})
        return
    lowered: list[str] = []

    def plan(names: list[str]) -> dict[str, str]:
        return decisions.expand({name: dtype for name in names})

    def must_keep(group: list[str]) -> Generator[dict[str, str], Measurement, list[str]]:
        measured = yield plan(lowered + group)
        if measured.error <= limit:
            lowered.extend(group)
            return []
        if len(group) == 1:
            return group
        half = len(group) // 2
        first = yield from must_keep(group[:half])
        second = yield from must_keep(group[half:])
        return first + second

    yield from must_keep([c.name for c in decisions.choices if dtype in c.dtypes and len(c.dtypes) > 1])


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a strategy picks the next plan: a sampler's trial parameters, or a proposer's plans."""

    name: str
    help: str
    sampler: Callable[[int], optuna.samplers.BaseSampler] = lambda seed: optuna.samplers.RandomSampler(seed=seed)
    proposer: Callable[[Decisions, float], Proposer] | None = None
    seeded: bool = False    # the study starts from sensitivity-seeded plans (and may use the ranked parametrisation)
    leads: bool = False     # its first trials are greedy's answer and the model-based proposals (``Lead``)

    @property
    def sampler_name(self) -> str:
        return f"{self.name} (no sampler)" if self.proposer else type(self.sampler(0)).__name__


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("optuna", "TPE from greedy's and the model's best plans (default)", sampler=_tpe, seeded=True,
             leads=True),
    Strategy("tpe", "seeded TPE without the baselines' lead (the default before it)", sampler=_tpe, seeded=True),
    Strategy("random", "random plans"),
    Strategy("global", "one dtype for the whole model", proposer=global_plans),
    Strategy("greedy", "all low, then back to fp32 by sensitivity", proposer=greedy_plans),
    Strategy("bisect", "bisection in graph order", proposer=bisect_plans),
)}
DEFAULT_STRATEGY = "optuna"


def named_strategy(name: str) -> Strategy:
    """The registered strategy called ``name`` (``--strategy``)."""
    if name not in STRATEGIES:
        raise InputError(f"--strategy {name!r}: use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


PRIOR_SAVING = 0.3   # share of FP32's latency a low dtype saves over the whole model, until probed
PROPOSALS = 8        # at most this many trials of model-based proposals


def proposal_for(decisions: Decisions, params: dict[str, int]) -> Proposal:
    """The model-based proposal over the decisions' choices, before any trial: the probe's error
    gain and all-low latency are the priors. ``params``: parameters each unit reads per call
    (``LayerGraph.streamed_params``: none for a storage unit, which reads only rows)."""
    choices = decisions.choices
    flops = {c.name: float(sum(decisions.flops.get(u, 0) for u in c.units)) for c in choices}
    sizes = {c.name: float(sum(params.get(u, 0) for u in c.units)) for c in choices}
    errors = ErrorModel({d: dict(per) for d, per in decisions.errors.items()},
                        {d: decisions.calibration.get(d, 1.0) for d in decisions.low})
    latency = LatencyModel(_shares(flops), _shares(sizes), [c.name for c in choices],
                           alpha={d: 1.0 - decisions.speed.get(d, 1.0 - PRIOR_SAVING) for d in decisions.low},
                           beta={d: 0.0 for d in decisions.low})
    return Proposal({c.name: c.dtypes for c in choices}, errors, latency)


def _shares(values: dict[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {name: value / total if total > 0 else 0.0 for name, value in values.items()}


class Lead:
    """The default strategy's first trials, enqueued one step ahead of the trial loop: greedy's
    answer (its first plan predicted, then checked by measurement), the model-based proposals
    along the predicted front, the sensitivity seeds; then the proposal re-solved as the
    calibration learns, while TPE samples the rest."""

    def __init__(self, decisions: Decisions, params: dict[str, int], limit: float, units: list[str],
                 held: dict[str, int] | None = None) -> None:
        self.decisions, self.limit, self.units = decisions, limit, units
        self.prior = proposal_for(decisions, params)
        dtype = decisions.preferred_low
        if dtype is None:   # no low precision to try: greedy's one plan is all FP32
            self.greedy = [decisions.expand({})]
            return
        lowered = [c for c in decisions.choices if dtype in c.dtypes and len(c.dtypes) > 1]

        def risk(choice) -> float:
            # ``held`` (parameters each unit holds; given under a weight budget): greedy returns to
            # FP32 first the choices with the most error per weight held, so its plans stay light.
            error = decisions.errors[dtype][choice.name]
            return error if held is None else error / max(sum(held.get(u, 0) for u in choice.units), 1)

        riskiest = sorted(lowered, key=lambda c: -risk(c))
        # greedy's plans: all low, then the k riskiest back in FP32
        self.greedy = [decisions.expand({c.name: dtype for c in riskiest[k:]}) for k in range(len(riskiest) + 1)]

    def observations(self, trials: list[optuna.trial.FrozenTrial]
                     ) -> tuple[list[Observation], dict[str, float]]:
        """Every measured plan among ``trials`` (the running trial's too), and its error by plan code."""
        observed, errors = [], {}
        for trial in trials:
            record = TrialRecord.of(trial, self.units)
            if record is None:
                continue
            error = math.inf if record.error is None else record.error
            speedup = record.speedup
            observed.append(Observation(self.decisions.by_choice(record.layers), error,
                                        1.0 / speedup if speedup else math.inf))
            errors[record.code] = error
        return observed, errors

    def calibrated(self, study: optuna.Study) -> Proposal:
        return self.prior.calibrated(self.observations(study.get_trials(deepcopy=False))[0])

    def predict(self, proposal: Proposal, layers: dict[str, str]) -> Prediction:
        return Prediction(*proposal.predict(self.decisions.by_choice(layers)))

    def after_trial(self, study: optuna.Study) -> None:
        """Enqueue what the measurements so far call for next (at setup: greedy's answer as the
        sensitivities predict it)."""
        trials = study.get_trials(deepcopy=False)
        observed, errors = self.observations(trials)
        proposal = self.prior.calibrated(observed)
        waiting = [lead for trial in trials if trial.state == optuna.trial.TrialState.WAITING
                   and (lead := lead_of(trial))]
        queued = {code for _, code in waiting}
        step = self._next_greedy(proposal, errors)
        if step is not None:
            self._enqueue_new(study, [step], "greedy", errors, queued)
            return
        proposed = sum(lead[0] == "proposal" for trial in trials if (lead := lead_of(trial)))
        if any(tag == "greedy" for tag, _ in waiting) or proposed >= PROPOSALS:
            return
        if not proposed:
            self._enqueue_new(study, self._front(proposal, FRONT), "proposal", errors, queued)
            for params in self.decisions.seeds():
                study.enqueue_trial(params, skip_if_exists=True)
        elif not waiting:  # re-solved with the calibration so far: the loosest plan not yet measured
            loosest_first = self._front(proposal, FRONT[::-1])
            self._enqueue_new(study, loosest_first, "proposal", errors, queued, at_most=1)

    def _front(self, proposal: Proposal, fractions: tuple[float, ...]) -> list[dict[str, str]]:
        try:
            return [self.decisions.expand(plan) for plan in proposal.front(self.limit, fractions)]
        except ValueError:  # a choice's only dtypes exceed the error budget: nothing to propose
            return []

    def _next_greedy(self, proposal: Proposal, errors: dict[str, float]) -> dict[str, str] | None:
        """Greedy's next plan to measure, None once its answer is known: the fewest units back in
        FP32 that measured within the limit while one fewer did not. The next k is the
        calibrated prediction, kept between the measured bounds."""
        if not self.greedy:
            return None
        measured = {k: errors[code] for k, plan in enumerate(self.greedy) if (code := encode(plan, self.units)) in errors}
        low = max((k + 1 for k, e in measured.items() if e > self.limit), default=0)
        high = min((k - 1 for k, e in measured.items() if e <= self.limit), default=len(self.greedy) - 1)
        if low > high:
            return None
        predicted = next((k for k, plan in enumerate(self.greedy)
                          if proposal.error.predict(self.decisions.by_choice(plan)) <= self.limit), high)
        return self.greedy[min(max(predicted, low), high)]

    def _enqueue_new(self, study: optuna.Study, plans: list[dict[str, str]], lead: str,
                     measured: dict[str, float], queued: set[str], at_most: int | None = None) -> None:
        """Enqueue the plans neither measured nor ``queued`` (the first ``at_most`` of them)."""
        fresh = [plan for plan in plans if (code := encode(plan, self.units)) not in measured and code not in queued]
        for plan in list({encode(p, self.units): p for p in fresh}.values())[:at_most]:
            self._enqueue(study, plan, lead)

    def _enqueue(self, study: optuna.Study, layers: dict[str, str], lead: str) -> None:
        study.enqueue_trial(self.decisions.params_for(layers), user_attrs=lead_marks(lead, encode(layers, self.units)))


def lead_plan(trial: optuna.Trial, units: list[str]) -> dict[str, str] | None:
    """The plan the search enqueued itself for ``trial``, if it did."""
    marks = lead_of(trial)
    return decode(marks[1], units) if marks else None


@dataclasses.dataclass(frozen=True)
class Found:
    layers: dict[str, str]
    measurement: Measurement | None   # None when nothing met the limit
    evaluations: int                  # accuracy evaluations of the whole model
    relative: dict[tuple, float] = dataclasses.field(default_factory=dict)  # feasible plan -> latency / FP32


def exhaustive(evaluator: Evaluator, units: list[str], dtypes: tuple[str, ...] = AUTOCAST,
               repeats: int = 3, finalists: int = 5) -> Found:
    """Error of every plan; latency of every feasible one; the fastest few re-timed longer."""
    feasible = []
    for combo in itertools.product(dtypes, repeat=len(units)):
        layers = dict(zip(units, combo))
        if evaluator.error(layers) <= evaluator.fidelity.limit:
            feasible.append(layers)
    evaluations = len(dtypes) ** len(units)
    if not feasible:
        return Found({}, None, evaluations)
    timed = sorted(((evaluator.measure(layers, repeats=repeats), layers) for layers in feasible),
                   key=lambda pair: pair[0].latency_ms / pair[0].baseline_ms)
    final = [(evaluator.measure(layers, repeats=5 * repeats), layers) for _, layers in timed[:finalists]]
    measurement, layers = min(final, key=lambda pair: relative_latency(pair[0]))
    table = {tuple(layers.values()): relative_latency(m) for m, layers in timed}
    table.update({tuple(layers.values()): relative_latency(m) for m, layers in final})
    return Found(layers, measurement, evaluations, table)


def relative_latency(measurement: Measurement) -> float:
    return measurement.latency_ms / measurement.baseline_ms if measurement.baseline_ms else math.inf

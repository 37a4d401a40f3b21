"""A plan's ``constraint`` and ``metrics`` sections as typed records.

They become plain mappings only where a plan or a study is written (``to_dict``) and are parsed
where one is read (``from_dict``). A record remembers the order its keys were given in and which
were given as null, so a plan file loads and saves back to the same text; ``PlanMetrics`` keeps the
keys it does not know in ``extra``.

>>> metrics = PlanMetrics.from_dict({"latency_ms": 1.5, "speedup_low": None, "custom": 2})
>>> metrics.latency_ms, metrics.extra, metrics.to_dict()
(1.5, {'custom': 2}, {'latency_ms': 1.5, 'speedup_low': None, 'custom': 2})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from precsearch.runtime.errors import PlanError

Number = int | float


def _known_fields(record: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(record) if field.name not in ("extra", "written"))


def _keys_in_order(record: Any, extra: Mapping[str, object]) -> tuple[str, ...]:
    """The keys ``record`` writes: those it was given (in their order, nulls too), then every other
    known field that is set, then the other ``extra`` keys."""
    given = tuple(record.written)
    known = tuple(name for name in _known_fields(type(record))
                  if name not in given and getattr(record, name) is not None)
    return given + known + tuple(key for key in extra if key not in given)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a plan had to hold: ``metric <= limit``, with the memory budget's limits
    (``memory.LIMITS``) and, for generating plans, ``min_token_agreement`` when set."""

    metric: str
    limit: Number
    min_token_agreement: Number | None = None
    max_weight_mb: Number | None = None
    max_peak_mb: Number | None = None
    written: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "written", _keys_in_order(self, {}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraint:
        """From a plan's or a study's ``constraint`` mapping; raise PlanError naming an unknown field."""
        known = _known_fields(cls)
        unknown = [key for key in data if key not in known]
        if unknown:
            raise PlanError(f"constraint: unknown field {unknown[0]!r}; expected {', '.join(known)}")
        return cls(**data, written=tuple(data))

    @classmethod
    def of(cls, value: Constraint | Mapping[str, Any] | None) -> Constraint | None:
        """``value`` as a Constraint: a mapping is parsed, a Constraint or None is kept."""
        return cls.from_dict(value) if isinstance(value, Mapping) else value

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.written}


@dataclasses.dataclass(frozen=True)
class PlanMetrics:
    """What was measured for a plan. ``latency_ms`` is the study's FP32 baseline over ``speedup``
    (its 95% interval ``speedup_low``..``speedup_high``); ``error`` the metric against FP32 on the
    search batches; compiled, held-out and generation fields are set only when measured."""

    latency_ms: Number | None = None
    baseline_latency_ms: Number | None = None
    speedup: Number | None = None
    speedup_low: Number | None = None
    speedup_high: Number | None = None
    error: Number | None = None
    peak_memory_mb: Number | None = None
    weight_mb: Number | None = None
    baseline_weight_mb: Number | None = None
    trial: int | None = None
    fp32_metric: Number | None = None              # the FP32 model's own value of the metric
    prefill_ms: Number | None = None                # generation, as workload.GenerationStats records it
    decode_ms_per_token: Number | None = None
    tokens_per_s: Number | None = None
    generated_tokens: int | None = None
    token_agreement: Number | None = None
    baseline_tokens_per_s: Number | None = None
    compiled_error: Number | None = None            # the plan raced compiled
    speedup_vs_compiled_fp32: Number | None = None
    compile_s: Number | None = None
    race_ties: int | None = None                     # plans tied with the final race's leader
    compiled_raced: int | None = None
    compiled_rank_agreement: Number | None = None
    holdout_error: Number | None = None             # on batches the search never saw
    holdout_batches: int | None = None
    extra: Mapping[str, Number | None] = dataclasses.field(default_factory=dict)
    written: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "written", _keys_in_order(self, self.extra))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanMetrics:
        """From a plan's ``metrics`` mapping: the keys this version does not know go to ``extra``."""
        known = set(_known_fields(cls))
        return cls(**{key: value for key, value in data.items() if key in known},
                   extra={key: value for key, value in data.items() if key not in known}, written=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        return {key: self.extra[key] if key in self.extra else getattr(self, key) for key in self.written}

    def with_values(self, **values: Any) -> PlanMetrics:
        """These metrics with ``values`` set; a key named here is written even when None."""
        written = self.written + tuple(key for key in values if key not in self.written)
        return dataclasses.replace(self, **values, written=written)

    @property
    def generates(self) -> bool:
        """Generation was measured (the plan's workload generates)."""
        return self.prefill_ms is not None

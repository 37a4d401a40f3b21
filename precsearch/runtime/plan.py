"""Precision plans: the ``precsearch-plan/2`` YAML format, validated once at the edge.

``precsearch-plan/1`` files still load: they were written before embedding tables were units,
so their tables stay FP32 (``storage_default: fp32``) whatever the default.

>>> plan = Plan(default="fp32", layers={"encoder.layer.0.attention.self.query": "bf16"})
>>> plan.precision("encoder.layer.0.attention.self.query"), plan.precision("pooler.dense")
('bf16', 'fp32')
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from precsearch.runtime.credentials import mask_credentials as mask_password  # the old name, kept for callers
from precsearch.runtime.errors import PlanError
from precsearch.runtime.memory import LIMITS as MEMORY_LIMITS
from precsearch.runtime.plan_sections import Constraint, PlanMetrics
from precsearch.runtime.precisions import AUTOCAST, FP32, PRECISIONS, choices_text, is_precision, needs_loss_scaling
from precsearch.runtime.yamlio import load_yaml_file

FORMAT = "precsearch-plan/2"
BEFORE_STORAGE_UNITS = "precsearch-plan/1"   # read too: its tables stay FP32
MODES = ("inference", "training")
_SECTIONS = ("format", "created", "model", "target", "mode", "default", "storage_default", "layers", "ties", "runtime",
             "loss_scaling", "constraint", "metrics", "search")


def check_precision(value: object, where: str) -> str:
    if not is_precision(value):
        raise PlanError(f"{where}: unknown dtype {value!r}; use one of {choices_text()}")
    return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling, with the meaning and defaults of ``torch.amp.GradScaler``."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        checks = {
            "init_scale": _is_finite(self.init_scale) and self.init_scale > 0,
            "growth_factor": _is_finite(self.growth_factor) and self.growth_factor > 1,
            "backoff_factor": _is_number(self.backoff_factor) and 0 < self.backoff_factor < 1,
            "growth_interval": isinstance(self.growth_interval, int) and not isinstance(
                self.growth_interval, bool) and self.growth_interval > 0,
        }
        rules = {"init_scale": "a finite number > 0", "growth_factor": "a finite number > 1",
                 "backoff_factor": "a number in (0, 1)",
                 "growth_interval": "a positive integer"}
        for field, ok in checks.items():
            if not ok:
                raise PlanError(f"loss_scaling.{field}: {getattr(self, field)!r} must be {rules[field]}")


WEIGHTS = ("low", "fp32")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a plan runs, as it was measured and is meant to be deployed.

    ``weights="low"``: each FP16/BF16 unit's own weights are held in its dtype while the plan is
    applied (inference only: no per-call cast, less memory, the same outputs). ``"fp32"``: FP32
    weights, cast by autocast on every call (training keeps FP32 master weights). ``compile``:
    the plan was measured compiled with ``torch.compile`` and should be deployed so.
    ``workload``: what a timed run was (``precsearch.runtime.workload.WORKLOADS``): one forward pass, or
    greedy generation of ``new_tokens`` tokens with the KV cache.
    """

    weights: str = "low"
    compile: bool = False
    workload: str = "forward"
    new_tokens: int | None = None

    def __post_init__(self) -> None:
        from precsearch.runtime.workload import WORKLOADS, Workload

        if self.weights not in WEIGHTS:
            raise PlanError(f"runtime.weights: {self.weights!r} must be one of {', '.join(WEIGHTS)}")
        if not isinstance(self.compile, bool):
            raise PlanError(f"runtime.compile: {self.compile!r} must be true or false")
        if self.workload not in WORKLOADS:
            raise PlanError(f"runtime.workload: {self.workload!r} must be one of {', '.join(WORKLOADS)}")
        generates = self.workload == "generate"
        if (self.new_tokens is not None or generates) and not (
                generates and isinstance(self.new_tokens, int) and not isinstance(self.new_tokens, bool)
                and self.new_tokens >= 1):
            wanted = "a positive integer (the tokens each run generates)" if generates else \
                "absent: it applies to workload: generate"
            raise PlanError(f"runtime.new_tokens: {self.new_tokens!r} must be {wanted}")
        object.__setattr__(self, "_workload", Workload(self.workload, self.new_tokens))

    @property
    def run(self) -> Any:
        """The ``precsearch.runtime.workload.Workload`` one timed run of the plan is."""
        return self._workload  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """As a plan writes it: the workload only when it is not the default (``forward``)."""
        return {"weights": self.weights, "compile": self.compile, **self.run.plan_fields()}

    @classmethod
    def default_for(cls, mode: str) -> Runtime:
        return cls(weights="fp32" if mode == "training" else "low")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_limit(value: object) -> bool:
    return _is_finite(value) and value >= 0  # type: ignore[operator]


def _is_budget(value: object) -> bool:
    return _is_finite(value) and value > 0  # type: ignore[operator]


def _is_fraction(value: object) -> bool:
    return _is_finite(value) and 0 <= value <= 1  # type: ignore[operator]


def _is_fingerprint(value: object) -> bool:
    return isinstance(value, str) and value.startswith("sha256:")


def _is_metric(value: object) -> bool:
    return value is None or _is_number(value)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float))  # bool is an int


def _is_str_or_null(value: object) -> bool:
    return value is None or isinstance(value, str)


# What each provenance section may hold: (rule per known field, rule for any other field, or None
# to refuse other fields). A rule is (test, what it wants). Checked at construction, so a wrong
# type is named here instead of crashing whatever reads the plan later.
_Rule = tuple[Callable[[object], bool], str]
_STRING: _Rule = (lambda value: isinstance(value, str), "a string")
_SCALAR: _Rule = (_is_scalar, "a string, number, boolean or null")
_COUNT: _Rule = (_is_count, "an integer >= 0")
_SECTION_RULES: dict[str, tuple[dict[str, _Rule], _Rule | None]] = {
    "model": ({"name": _STRING, "fingerprint": (_is_fingerprint, "a string 'sha256:...'"), "units": _COUNT},
              _SCALAR),
    "target": ({}, _STRING),
    "constraint": ({"metric": _STRING, "limit": (_is_limit, "a finite number >= 0"),
                    **{limit.key: (_is_budget, "a finite number > 0 (MB)") for limit in MEMORY_LIMITS},
                    "min_token_agreement": (_is_fraction, "a number from 0 to 1")}, None),
    "metrics": ({}, (_is_metric, "a number or null")),
    "search": ({"space": _STRING, "trials": _COUNT, "sampler": _STRING, "study": _STRING,
                "storage": (_is_str_or_null, "a storage URL string or null")}, _SCALAR),
}
_REQUIRED = {"constraint": ("metric", "limit")}
_SECTION_TYPES: dict[str, tuple[type, ...]] = {"constraint": (dict, Constraint), "metrics": (dict, PlanMetrics),
                                               "search": (dict,)}
_KINDS = {str: "string", dict: "mapping", list: "list", bool: "boolean", int: "int", float: "float"}


def _found(value: object) -> str:
    """``int 12345``: a value's YAML kind and a short rendering of it, for messages."""
    if value is None:
        return "null"
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{_KINDS.get(type(value), type(value).__name__)} {text}"


def _plain(section: Constraint | PlanMetrics | dict[str, Any]) -> dict[str, Any]:
    """A section as the mapping a plan file holds (a record's ``to_dict``)."""
    return section.to_dict() if isinstance(section, (Constraint, PlanMetrics)) else section


def _check_section(section: str, mapping: dict[str, Any]) -> None:
    """Check one provenance section against ``_SECTION_RULES``; raise PlanError naming the field."""
    known, other = _SECTION_RULES[section]
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise PlanError(f"{section}: field name {_found(key)} must be a string")
        rule = known.get(key, other)
        if rule is None:
            raise PlanError(f"{section}: unknown field {key!r}; expected {', '.join(known)}")
        test, wanted = rule
        if not test(value):
            raise PlanError(f"{section}.{key}: expected {wanted}, found {_found(value)}")
    for key in _REQUIRED.get(section, ()):
        if key not in mapping:
            raise PlanError(f"{section}.{key}: missing; {section} needs {', '.join(_REQUIRED[section])}")


def _created(value: object) -> object:
    """``created`` as a plan stores it: a YAML timestamp becomes ``YYYY-MM-DDTHH:MM:SSZ`` (UTC),
    null becomes ""; anything else is left for ``Plan`` to check."""
    if value is None:
        return ""
    if isinstance(value, _dt.datetime):  # before date: a datetime is a date too
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")  # a naive timestamp is taken as UTC
    if isinstance(value, _dt.date):
        return value.strftime("%Y-%m-%dT00:00:00Z")
    return value


@dataclasses.dataclass(frozen=True)
class Plan:
    """A per-unit precision assignment plus the provenance that makes it reproducible."""

    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    default: str = FP32
    mode: str = "inference"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    target: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss_scaling: LossScaling | None = None
    runtime: Runtime | None = None     # None: Runtime.default_for(mode)
    constraint: Constraint | None = None   # a mapping given here is parsed into one
    metrics: PlanMetrics | None = None     # likewise
    search: dict[str, Any] | None = None
    ties: dict[str, str] = dataclasses.field(default_factory=dict)  # unit -> the unit it must share a precision with
    storage_default: str | None = None   # storage units (embedding tables) not named: this dtype; None: default
    created: str = dataclasses.field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def __post_init__(self) -> None:
        check_precision(self.default, "default")
        if self.storage_default is not None and not PRECISIONS[check_precision(
                self.storage_default, "storage_default")].autocast:
            raise PlanError(f"storage_default: {self.storage_default} cannot hold a table; use one of "
                            f"{', '.join(AUTOCAST)}")
        if not isinstance(self.layers, dict):
            raise PlanError(f"layers: must be a mapping of unit name -> one of {choices_text()}")
        for name, precision in self.layers.items():
            if not isinstance(name, str):
                raise PlanError(f"layers: unit name {name!r} must be a string")
            check_precision(precision, f"layers.{name}")
        if not isinstance(self.ties, dict) or not all(
                isinstance(unit, str) and isinstance(outer, str) for unit, outer in self.ties.items()):
            raise PlanError("ties: must be a mapping of unit name -> the unit name it must share a precision with")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise PlanError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        for section in ("model", "target"):
            if not isinstance(getattr(self, section), dict):
                raise PlanError(f"{section}: must be a mapping")
        for section in ("constraint", "metrics", "search"):
            if getattr(self, section) is not None and not isinstance(getattr(self, section), _SECTION_TYPES[section]):
                raise PlanError(f"{section}: must be a mapping or null")
        for section in _SECTION_RULES:
            if getattr(self, section) is not None:
                _check_section(section, _plain(getattr(self, section)))
        self._parse_sections()
        if self.loss_scaling is not None and not isinstance(self.loss_scaling, LossScaling):
            raise PlanError(f"loss_scaling: expected a LossScaling or null, "
                            f"found {_found(self.loss_scaling)}")
        if not PRECISIONS[self.default].autocast:
            raise PlanError(f"default: {self.default} is given to units by name, not as the default; "
                            f"use one of {', '.join(AUTOCAST)}")
        if self.mode == "training":
            for unit, precision in self.layers.items():
                if PRECISIONS[precision].inference_only:
                    raise PlanError(f"layers.{unit}: {precision} runs in inference plans only")
        if self.runtime is not None and not isinstance(self.runtime, Runtime):
            raise PlanError(f"runtime: expected a Runtime or null, found {_found(self.runtime)}")
        if self.mode == "training" and self.resolved_runtime.weights == "low":
            raise PlanError("runtime.weights: a training plan keeps FP32 master weights; use weights: fp32")
        if not isinstance(self.created, str):
            raise PlanError(f"created: expected a time string such as '2026-11-28T12:00:00Z', "
                            f"found {_found(self.created)}")

    def _parse_sections(self) -> None:
        """``constraint`` and ``metrics`` given as mappings (checked above) become their records."""
        if isinstance(self.constraint, dict):
            object.__setattr__(self, "constraint", Constraint.from_dict(self.constraint))
        if isinstance(self.metrics, dict):
            object.__setattr__(self, "metrics", PlanMetrics.from_dict(self.metrics))

    @classmethod
    def compact(cls, layers: dict[str, str], **fields: Any) -> Plan:
        """The plan that gives every unit in ``layers`` its dtype, written compactly: the most
        common dtype becomes the default (fp32 on ties) and only the others are listed.

        The search measures exactly this form, so a saved plan runs as it was measured.
        """
        counts = Counter(layers.values())
        default = min(AUTOCAST, key=lambda d: (-counts.get(d, 0), d != FP32)) if counts else FP32
        return cls(default=default, layers={u: d for u, d in layers.items() if d != default}, **fields)

    def precision(self, unit: str) -> str:
        """The precision of ``unit``: its own entry, else the plan's default (a storage unit's,
        when the plan has a ``storage_default``, once ``for_model`` spelled it out)."""
        return self.layers.get(unit, self.default)

    def for_model(self, model: nn.Module) -> Plan:
        """The plan with ``storage_default`` spelled out for each of ``model``'s storage modules
        it does not name: the form the applier and the audit read."""
        if self.storage_default is None:
            return self
        from precsearch.runtime.ops import is_storage_module

        tables = {name: self.storage_default for name, module in model.named_modules()
                  if is_storage_module(module) and name not in self.layers}
        return dataclasses.replace(self, layers={**self.layers, **tables}, storage_default=None)

    @property
    def measured(self) -> PlanMetrics:
        """The plan's metrics; a plan that records none reads as every metric unknown."""
        return self.metrics if self.metrics is not None else PlanMetrics()

    @property
    def needs_loss_scaling(self) -> bool:
        """Training with this plan needs dynamic loss scaling (it has an FP16 unit)."""
        return needs_loss_scaling({self.default, *self.layers.values()})

    def counts(self, units: list[str] | None = None) -> Counter[str]:
        """Units per precision, over ``units`` (default: the units the plan names)."""
        return Counter(self.precision(name) for name in (units if units is not None else self.layers))

    # -- model checks ---------------------------------------------------------------------
    def validate_for(self, model: nn.Module, *, fingerprint_mismatch: str = "error",
                     names: set[str] | None = None) -> None:
        """Check that every named layer exists in ``model`` and the fingerprint matches.

        ``fingerprint_mismatch="warn"`` downgrades a fingerprint mismatch to a warning;
        ``"ignore"`` skips the check (for callers that already made it once).
        """
        pairs = [(f"layers.{name}", name) for name in self.layers] + [
            (f"ties.{unit}", name) for unit, outer in self.ties.items() for name in (unit, outer)]
        named = [(where, name, "of that name" if where.endswith(f".{name}") else repr(name)) for where, name in pairs]
        if names is None:
            names = {name for name, _ in model.named_modules()} if named else set()
        for where, name, what in named:
            if name not in names:
                near = _closest(name, names)
                hint = f" (did you mean {near!r}?)" if near else ""
                raise PlanError(f"{where}: the model has no module {what}{hint}")
        for name, precision in self.layers.items():
            reason = PRECISIONS[precision].unsuitable(model.get_submodule(name))
            if reason:
                raise PlanError(f"layers.{name}: {reason}")
        expected = self.model.get("fingerprint")
        if expected and fingerprint_mismatch != "ignore":
            actual = model_fingerprint(model)
            if actual != expected:
                message = (f"model.fingerprint: the plan was made for another model "
                           f"({expected[:19]}..., this model is {actual[:19]}...)")
                if fingerprint_mismatch == "warn":
                    warnings.warn(message, stacklevel=2)
                else:
                    raise PlanError(message + "; pass --ignore-fingerprint to apply it anyway")

    @property
    def resolved_runtime(self) -> Runtime:
        """The runtime: as the plan says, else the default for its mode."""
        return self.runtime if self.runtime is not None else Runtime.default_for(self.mode)

    # -- YAML -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        search = dict(self.search) if self.search is not None else None
        if search and isinstance(search.get("storage"), str):
            search["storage"] = mask_password(search["storage"])
        return {
            "format": FORMAT,
            "created": self.created,
            "model": dict(self.model),
            "target": dict(self.target),
            "mode": self.mode,
            "default": self.default,
            **({"storage_default": self.storage_default} if self.storage_default else {}),
            "layers": dict(self.layers),
            **({"ties": dict(self.ties)} if self.ties else {}),
            "runtime": self.runtime.to_dict() if self.runtime else None,
            "loss_scaling": dataclasses.asdict(self.loss_scaling) if self.loss_scaling else None,
            "constraint": self.constraint.to_dict() if self.constraint is not None else None,
            "metrics": self.metrics.to_dict() if self.metrics is not None else None,
            "search": search,
        }

    def dumps(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically: a reader sees the old file or the new one, never half."""
        return write_atomic(path, self.dumps())

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: not a precsearch plan (expected a YAML mapping)")
        version = data.get("format")
        if version not in (FORMAT, BEFORE_STORAGE_UNITS):
            if isinstance(version, str) and version.startswith("precsearch-plan/"):
                raise PlanError(f"{source}: format {version!r} is not supported by this precsearch "
                                f"(it reads {FORMAT}); upgrade precsearch")
            raise PlanError(f"{source}: format must be {FORMAT!r}, found {version!r}")
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise PlanError(f"{source}: unknown field {sorted(unknown, key=str)[0]!r}")
        try:
            return cls(
                layers=_given(data, "layers", {}),
                ties=_given(data, "ties", {}),
                default=data.get("default", FP32),
                storage_default=FP32 if version == BEFORE_STORAGE_UNITS else data.get("storage_default"),
                mode=data.get("mode", "inference"),
                model=_given(data, "model", {}),
                target=_given(data, "target", {}),
                loss_scaling=_loss_scaling(data.get("loss_scaling")),
                runtime=_runtime(data.get("runtime")),
                constraint=data.get("constraint"),
                metrics=data.get("metrics"),
                search=data.get("search"),
                created=_created(data.get("created")),  # type: ignore[arg-type]
            )
        except PlanError as error:
            raise PlanError(f"{source}: {error}") from None


def _given(data: dict[str, Any], key: str, default: object) -> Any:
    """``data[key]``, or ``default`` when absent or null (but not when merely falsy: ``layers: []``
    is a mistake to report, not an empty plan)."""
    value = data.get(key)
    return default if value is None else value


def _runtime(raw: object) -> Runtime | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PlanError(f"runtime: expected a mapping such as {{weights: low, compile: false}}, found {_found(raw)}")
    extra = sorted(set(raw) - {"weights", "compile", "workload", "new_tokens"}, key=str)
    if extra:
        raise PlanError(f"runtime: unknown field {extra[0]!r}; it has weights, compile, workload and new_tokens")
    return Runtime(**raw)


def _loss_scaling(raw: object) -> LossScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PlanError(f"loss_scaling: expected a mapping or null, found {_found(raw)}")
    allowed = [f.name for f in dataclasses.fields(LossScaling)]
    extra = sorted(set(raw) - set(allowed), key=str)
    if extra:
        raise PlanError(f"loss_scaling: unknown field {extra[0]!r}; expected {', '.join(allowed)}")
    return LossScaling(**raw)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file with the safe loader of ``precsearch.runtime.yamlio``: Python tags,
    duplicate keys, anchors and aliases are refused, never executed or expanded."""
    return Plan.from_dict(load_yaml_file(path, PlanError, what="plan"), source=str(path))


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plan is meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the module tree: qualified names, classes and parameter shapes.

    Precision units are a function of this tree (and the code), so a plan applied to a model
    with another fingerprint names units that may not exist or mean something else.
    """
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        params = ",".join(f"{key}:{tuple(p.shape)}" for key, p in module.named_parameters(recurse=False))
        digest.update(f"{name}|{type(module).__qualname__}|{params}\n".encode())
    return "sha256:" + digest.hexdigest()


def _closest(name: str, candidates: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.8)
    return matches[0] if matches else None

"""Precision plans: the ``precsearch-plan/1`` YAML format, validated once at the edge.

>>> plan = Plan(default="fp32", layers={"encoder.layer.0.attention.self.query": "bf16"})
>>> plan.precision("encoder.layer.0.attention.self.query"), plan.precision("pooler.dense")
('bf16', 'fp32')
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from precsearch.errors import PlanError
from precsearch.precisions import FP32, NAMES, choices_text, is_precision, needs_loss_scaling

FORMAT = "precsearch-plan/1"
MODES = ("inference", "training")
_SECTIONS = ("format", "created", "model", "target", "mode", "default", "layers", "loss_scaling",
             "constraint", "metrics", "search")


def check_precision(value: object, where: str) -> str:
    if not is_precision(value):
        raise PlanError(f"{where}: unknown dtype {value!r}; use one of {choices_text()}")
    return value  # type: ignore[return-value]


def mask_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling, with the meaning and defaults of ``torch.amp.GradScaler``."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        checks = {
            "init_scale": _is_number(self.init_scale) and self.init_scale > 0,
            "growth_factor": _is_number(self.growth_factor) and self.growth_factor > 1,
            "backoff_factor": _is_number(self.backoff_factor) and 0 < self.backoff_factor < 1,
            "growth_interval": isinstance(self.growth_interval, int) and not isinstance(
                self.growth_interval, bool) and self.growth_interval > 0,
        }
        rules = {"init_scale": "> 0", "growth_factor": "> 1", "backoff_factor": "in (0, 1)",
                 "growth_interval": "a positive integer"}
        for field, ok in checks.items():
            if not ok:
                raise PlanError(f"loss_scaling.{field}: {getattr(self, field)!r} must be {rules[field]}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A per-unit precision assignment plus the provenance that makes it reproducible."""

    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    default: str = FP32
    mode: str = "inference"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    target: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss_scaling: LossScaling | None = None
    constraint: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    created: str = dataclasses.field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def __post_init__(self) -> None:
        check_precision(self.default, "default")
        if not isinstance(self.layers, dict):
            raise PlanError(f"layers: must be a mapping of unit name -> one of {choices_text()}")
        for name, precision in self.layers.items():
            if not isinstance(name, str):
                raise PlanError(f"layers: unit name {name!r} must be a string")
            check_precision(precision, f"layers.{name}")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise PlanError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        for section in ("model", "target"):
            if not isinstance(getattr(self, section), dict):
                raise PlanError(f"{section}: must be a mapping")
        for section in ("constraint", "metrics", "search"):
            if getattr(self, section) is not None and not isinstance(getattr(self, section), dict):
                raise PlanError(f"{section}: must be a mapping or null")

    @classmethod
    def compact(cls, layers: dict[str, str], **fields: Any) -> Plan:
        """The plan that gives every unit in ``layers`` its dtype, written compactly: the most
        common dtype becomes the default (fp32 on ties) and only the others are listed.

        The search measures exactly this form, so a saved plan runs as it was measured.
        """
        counts = Counter(layers.values())
        default = min(NAMES, key=lambda d: (-counts.get(d, 0), d != FP32)) if counts else FP32
        return cls(default=default, layers={u: d for u, d in layers.items() if d != default}, **fields)

    def precision(self, unit: str) -> str:
        """The precision of ``unit``: its own entry, else the plan's default."""
        return self.layers.get(unit, self.default)

    @property
    def needs_loss_scaling(self) -> bool:
        """Training with this plan needs dynamic loss scaling (it has an FP16 unit)."""
        return needs_loss_scaling({self.default, *self.layers.values()})

    def counts(self, units: list[str] | None = None) -> Counter:
        """Units per precision, over ``units`` (default: the units the plan names)."""
        return Counter(self.precision(name) for name in (units if units is not None else self.layers))

    # -- model checks ---------------------------------------------------------------------
    def validate_for(self, model: nn.Module, *, fingerprint_mismatch: str = "error",
                     names: set[str] | None = None) -> None:
        """Check that every named layer exists in ``model`` and the fingerprint matches.

        ``fingerprint_mismatch="warn"`` downgrades a fingerprint mismatch to a warning;
        ``"ignore"`` skips the check (for callers that already made it once).
        """
        if names is None:
            names = {name for name, _ in model.named_modules()} if self.layers else set()
        for name in self.layers:
            if name not in names:
                near = _closest(name, names)
                hint = f" (did you mean {near!r}?)" if near else ""
                raise PlanError(f"layers.{name}: the model has no module of that name{hint}")
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

    # -- YAML -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        search = dict(self.search) if self.search else None
        if search and isinstance(search.get("storage"), str):
            search["storage"] = mask_password(search["storage"])
        return {
            "format": FORMAT,
            "created": self.created,
            "model": dict(self.model),
            "target": dict(self.target),
            "mode": self.mode,
            "default": self.default,
            "layers": dict(self.layers),
            "loss_scaling": dataclasses.asdict(self.loss_scaling) if self.loss_scaling else None,
            "constraint": self.constraint,
            "metrics": self.metrics,
            "search": search,
        }

    def dumps(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically: a reader sees the old file or the new one, never half."""
        return write_atomic(path, self.dumps())

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: not a precsearch plan (expected a YAML mapping)")
        version = data.get("format")
        if version != FORMAT:
            if isinstance(version, str) and version.startswith("precsearch-plan/"):
                raise PlanError(f"{source}: format {version!r} is not supported by this precsearch "
                                f"(it reads {FORMAT}); upgrade precsearch")
            raise PlanError(f"{source}: format must be {FORMAT!r}, found {version!r}")
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise PlanError(f"{source}: unknown field {sorted(unknown)[0]!r}")
        scaling = data.get("loss_scaling")
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise PlanError(f"{source}: loss_scaling must be a mapping or null")
            allowed = {f.name for f in dataclasses.fields(LossScaling)}
            if set(scaling) - allowed:
                raise PlanError(f"{source}: loss_scaling has unknown field {sorted(set(scaling) - allowed)[0]!r}")
            scaling = LossScaling(**scaling)
        try:
            return cls(
                layers=data.get("layers") or {},
                default=data.get("default", FP32),
                mode=data.get("mode", "inference"),
                model=data.get("model") or {},
                target=data.get("target") or {},
                loss_scaling=scaling,
                constraint=data.get("constraint"),
                metrics=data.get("metrics"),
                search=data.get("search"),
                created=str(data.get("created", "")),
            )
        except PlanError as error:
            raise PlanError(f"{source}: {error}") from None


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file (``yaml.safe_load`` only: tags such as ``!!python/object``
    are refused, never executed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PlanError(f"{path}: cannot read plan ({getattr(error, 'strerror', None) or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise PlanError(f"{path}: not valid YAML{where}: {problem}".replace("\n", " ")) from None
    return Plan.from_dict(data, source=str(path))


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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

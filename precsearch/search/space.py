"""Search spaces (``precsearch-space/1`` YAML): which dtypes each unit may take, and which units
share one choice.

>>> space = SearchSpace.load("transformer")                     # doctest: +SKIP
>>> [c.name for c in space.choices(graph, "cpu")][:2]           # doctest: +SKIP
['encoder.layer.0.attention', 'encoder.layer.0']
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import warnings
from pathlib import Path
from typing import Any

from precsearch.runtime.errors import InputError
from precsearch.search.graph import LayerGraph
from precsearch.runtime.precisions import AUTOCAST, FP32, NAMES, PRECISIONS, choices_text, is_precision
from precsearch.runtime.yamlio import load_yaml_file

FORMAT = "precsearch-space/1"
_FIELDS = {"format", "name", "dtypes", "rules", "groups"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Units matching ``name`` (regex, searched) and/or ``types`` (class names) may take ``dtypes``."""

    dtypes: tuple[str, ...]
    name: re.Pattern | None = None
    types: tuple[str, ...] | None = None

    def matches(self, unit: str, unit_type: str) -> bool:
        return ((self.name is None or self.name.search(unit) is not None)
                and (self.types is None or unit_type in self.types))


@dataclasses.dataclass(frozen=True)
class Choice:
    """One decision of the search: a unit, or a group of units that share a dtype."""

    name: str
    units: tuple[str, ...]
    dtypes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    name: str
    dtypes: tuple[str, ...] = AUTOCAST
    rules: tuple[Rule, ...] = ()
    groups: tuple[re.Pattern, ...] = ()
    source: str = "<inline>"

    def __post_init__(self) -> None:
        _check_dtypes(self.dtypes, f"{self.source}: dtypes")

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str) -> SearchSpace:
        """A named space shipped with precsearch (``"transformer"``) or a YAML file path."""
        path = Path(spec)
        if path.suffix in (".yaml", ".yml") or path.exists():
            data = load_yaml_file(path, InputError, what="search space", source=f"--space {spec}")
            return cls.parse(data, str(path))
        named = available_spaces()
        if spec not in named:
            raise InputError(f"--space {spec!r}: no such named space or file; named spaces: {', '.join(named)}")
        return cls.parse(load_yaml_file(_spaces_dir() / f"{spec}.yaml", InputError, what="search space",
                                        source=spec), spec)

    @classmethod
    def parse(cls, data: Any, source: str) -> SearchSpace:
        if not isinstance(data, dict):
            raise InputError(f"{source}: not a search space (expected a YAML mapping)")
        if data.get("format") != FORMAT:
            raise InputError(f"{source}: format must be {FORMAT!r}, found {data.get('format')!r}")
        unknown = set(data) - _FIELDS
        if unknown:
            raise InputError(f"{source}: unknown field {sorted(unknown, key=str)[0]!r}")
        dtypes = tuple(_as_list(data.get("dtypes", list(AUTOCAST)), f"{source}: dtypes"))
        _check_dtypes(dtypes, f"{source}: dtypes")  # before the rules, which must stay within them
        rules = []
        for index, raw in enumerate(_as_list(_or_empty(data.get("rules")), f"{source}: rules")):
            where = f"{source}: rules[{index}]"
            if not isinstance(raw, dict) or "dtypes" not in raw or set(raw) - {"name", "type", "dtypes"}:
                raise InputError(f"{where}: expected {{name: REGEX, type: [Class], dtypes: [...]}}")
            rule_dtypes = tuple(_as_list(raw["dtypes"], f"{where}.dtypes"))
            _check_dtypes(rule_dtypes, f"{where}.dtypes")
            _check_within(rule_dtypes, dtypes, f"{where}.dtypes")
            types = raw.get("type")
            rules.append(Rule(rule_dtypes, _regex(raw["name"], f"{where}.name") if "name" in raw else None,
                              tuple(_as_list(types, f"{where}.type")) if types is not None else None))
        groups = tuple(_regex(pattern, f"{source}: groups[{i}]")
                       for i, pattern in enumerate(_as_list(_or_empty(data.get("groups")), f"{source}: groups")))
        for i, pattern in enumerate(groups):
            if pattern.groups < 1:
                raise InputError(f"{source}: groups[{i}] needs a capture group: units whose capture matches "
                                 f"share one choice")
        return cls(str(data.get("name", source)), dtypes, tuple(rules), groups, source)

    # -- applying to a model --------------------------------------------------------------------
    def unit_dtypes(self, unit: str, unit_type: str, usable: tuple[str, ...]) -> tuple[str, ...]:
        for rule in self.rules:
            if rule.matches(unit, unit_type):
                allowed = rule.dtypes
                break
        else:
            allowed = self.dtypes
        return tuple(d for d in allowed if d in usable) or (FP32,)

    def choices(self, graph: LayerGraph, device_type: str, ties: dict[str, str] | None = None) -> list[Choice]:
        """The decisions for ``graph``'s units, in execution order of their first unit.

        ``ties`` maps a unit to the unit whose precision it must share (found by the search's
        setup: units holding one weight, or the model fails when they differ), so they join one
        choice; ties chain (a unit tied to a unit tied to a third joins the third's choice).
        """
        usable = usable_dtypes(self.dtypes, device_type)
        members: dict[str, list[str]] = {}
        for unit in graph.units:
            members.setdefault(self.group_of(_tied_to(unit, ties or {})), []).append(unit)
        choices = []
        for name, units in members.items():
            allowed = set.intersection(*(set(self.unit_dtypes(u, graph[u]["type"], tuple(
                d for d in usable if d not in graph[u].get("unsuited", ())))) for u in units))
            if not allowed:
                raise InputError(f"{self.source}: group {name!r} has no dtype all its units may take")
            choices.append(Choice(name, tuple(units), tuple(d for d in NAMES if d in allowed)))
        return choices

    def group_of(self, unit: str) -> str:
        for pattern in self.groups:
            match = pattern.search(unit)
            if match and match.group(1) is not None:
                return match.group(1)
        return unit


def _tied_to(unit: str, ties: dict[str, str]) -> str:
    """The end of ``unit``'s chain of ties (``unit`` when it has none)."""
    seen = {unit}
    while unit in ties and ties[unit] not in seen:
        unit = ties[unit]
        seen.add(unit)
    return unit


def usable_dtypes(dtypes: tuple[str, ...], device_type: str) -> tuple[str, ...]:
    """``dtypes`` minus those the device cannot autocast to, with a notice for each one dropped."""
    usable = []
    for dtype in dtypes:
        if PRECISIONS[dtype].available(device_type):
            usable.append(dtype)
        else:
            warnings.warn(f"{dtype} dropped from the search: the {device_type} device cannot run it", stacklevel=2)
    if FP32 not in usable:
        usable.append(FP32)
    return tuple(usable)


def _spaces_dir() -> Path:
    """Shipped spaces: package data when installed, the repository's folder in a checkout."""
    try:
        folder = importlib.resources.files("precsearch.search_spaces")
        if folder.joinpath("default.yaml").is_file():
            return Path(str(folder))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "search_spaces"


def available_spaces() -> list[str]:
    return sorted(path.stem for path in _spaces_dir().glob("*.yaml"))


def _or_empty(value: Any) -> Any:
    """An absent or empty (``rules:``) YAML field is an empty list; any other value must be one."""
    return [] if value is None else value


def _as_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise InputError(f"{where}: expected a list, found {type(value).__name__}")
    return value


def _check_dtypes(dtypes: tuple, where: str) -> None:
    if not dtypes:
        raise InputError(f"{where}: empty; give at least one of {choices_text()}")
    for dtype in dtypes:
        if not is_precision(dtype):
            raise InputError(f"{where}: unknown dtype {dtype!r}; use {choices_text()}")


def _check_within(rule_dtypes: tuple, dtypes: tuple, where: str) -> None:
    """A rule narrows the top-level ``dtypes``; FP32, always a candidate, may be named anyway."""
    outside = [dtype for dtype in rule_dtypes if dtype not in dtypes and dtype != FP32]
    if outside:
        raise InputError(f"{where}: {outside[0]} is not in the top-level dtypes [{', '.join(dtypes)}]; "
                         f"add it there or remove it from the rule")


def _regex(pattern: Any, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise InputError(f"{where}: expected a regular expression string")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise InputError(f"{where}: invalid regular expression {pattern!r} ({error})") from None

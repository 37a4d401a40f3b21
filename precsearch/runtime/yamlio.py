"""Read YAML text into plain Python data, safely: the loader behind plan and space files.

On top of ``yaml.SafeLoader`` (no Python tags, ever) it refuses what a hand-edited or hostile
file can use to mislead or hurt:

- a duplicate mapping key, at any depth (YAML keeps the last one silently);
- anchors, aliases and merge keys (``&a``, ``*a``, ``<<``): a 1 KB alias bomb expands to
  gigabytes, and plans and spaces never need shared nodes;
- nesting deeper than ``MAX_DEPTH`` (the composer recurses once per level).

Every refusal, and every syntax error, becomes the caller's error class with a one-line message
that starts with the source name and gives the line number.

>>> load_yaml("a: 1\\nb: [x, y]\\n", "example.yaml")
{'a': 1, 'b': ['x', 'y']}
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Hashable
from typing import Any, Protocol

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, Event, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode

from precsearch.runtime.errors import InputError

MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.YAMLError):
    """Input the safe loader will not read; the message gives the (1-based) line."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors, aliases, merge keys or duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        # Refuse at the event, before any node is built: an alias bomb fails on its first anchor.
        event: Event = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in types-PyYAML
        if isinstance(event, AliasEvent) or (isinstance(event, NodeEvent) and event.anchor is not None):
            sign = "*" if isinstance(event, AliasEvent) else "&"
            raise _Refused(f"YAML anchor or alias {sign}{event.anchor}{_where(event.start_mark)} is not "
                           f"allowed; write the value out")
        if not isinstance(event, CollectionStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep{_where(event.start_mark)}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise _Refused(f"YAML merge key '<<' at line {line} is not allowed; write the keys out")
            if not isinstance(key_node, ScalarNode):
                continue  # a collection key is unhashable: the base class reports it
            key = self.construct_object(key_node)
            if key in first_line:
                first = first_line[key]
                raise _Refused(f"duplicate key {_short(key)} at line {line} (first at line {first}); "
                               f"keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_timestamp(self, node: ScalarNode) -> Any:
        # YAML reads 2026-13-45 as a timestamp; the date it names does not exist.
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as failure:
            raise _Refused(f"{node.value!r} at line {node.start_mark.line + 1} is not a valid date or time "
                           f"({failure}); fix it, or quote it to keep it as text") from None


_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _StrictLoader.construct_yaml_timestamp)


def load_yaml(text: str, source: str, error: type[InputError] = InputError) -> Any:
    """Parse one YAML document from ``text`` into plain data (dicts, lists, scalars).

    Raises ``error`` (a one-line message starting with ``source``) for a syntax error, a Python
    tag, a duplicate key, an anchor or alias, or nesting deeper than ``MAX_DEPTH``.
    """
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader checks for unprintable characters here
        return loader.get_single_data()
    except _Refused as refused:
        raise error(f"{source}: {refused}") from None
    except yaml.MarkedYAMLError as failure:
        raise error(f"{source}: not valid YAML{_where(failure.problem_mark)}: "
                    f"{_one_line(failure.problem or failure.context or 'syntax error')}") from None
    except yaml.reader.ReaderError as failure:
        line = text.count("\n", 0, failure.position) + 1
        raise error(f"{source}: not valid YAML at line {line}: character U+{failure.character:04X} "
                    f"is not allowed in YAML text") from None
    except yaml.YAMLError as failure:
        raise error(f"{source}: not valid YAML: {_one_line(str(failure))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str | os.PathLike[str], error: type[InputError] = InputError, what: str = "file",
                   source: str | None = None) -> Any:
    """Read ``path`` as UTF-8 YAML (see :func:`load_yaml`); ``what`` names it in messages
    (``"cannot read plan"``), ``source`` replaces the path as the message's first word."""
    source = source or str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as failure:
        raise error(f"{source}: cannot read {what} ({failure.strerror or failure})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"{source}: cannot read {what}: not UTF-8 text (byte 0x{raw[failure.start]:02x} "
                    f"at offset {failure.start}); is it a binary file?") from None
    return load_yaml(text, source, error)


class _Mark(Protocol):
    """A position in the text: PyYAML's pure-Python and C marks both have one."""

    line: int


def _where(mark: _Mark | None) -> str:
    return f" at line {mark.line + 1}" if mark is not None else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

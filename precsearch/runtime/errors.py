"""The errors precsearch raises at its users."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class PrecsearchError(Exception):
    """Every error precsearch raises on purpose: ``except precsearch.PrecsearchError`` catches them all."""


class InputError(PrecsearchError, ValueError):
    """Bad input: a file, field, factory or argument the user must fix (CLI exit code 2).

    The message is one line and names the culprit: a line break inside it (a unit name, a
    quoted file line) is shown escaped, as ``\\n``.
    """

    def __init__(self, message: str = "bad input") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class PlanError(InputError):
    """A precision plan that cannot be read, or does not fit the model."""


def described(error: BaseException, width: int = 300) -> str:
    """``Type: first line of its message`` (the type alone when it has none): an exception in one line."""
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text.splitlines()[0][:width]}" if text else name


@contextmanager
def failures_as(error_type: type[InputError], prefix: str,
                keep: type[BaseException] | tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Any failure inside the block, but one of ``keep``, becomes one ``error_type`` line:
    ``prefix`` then the failure, ``described``."""
    try:
        yield
    except keep:
        raise
    except Exception as failure:
        raise error_type(prefix + described(failure)) from failure

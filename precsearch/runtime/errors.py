"""The errors precsearch raises at its users."""


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

"""The errors precsearch raises at its users."""


class InputError(ValueError):
    """Bad input: a file, field, factory or argument the user must fix (CLI exit code 2).

    The message is one line and names the culprit.
    """


class PlanError(InputError):
    """A precision plan that cannot be read, or does not fit the model."""

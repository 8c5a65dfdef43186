"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a missing file, an unknown format, a shape that does not fit."""

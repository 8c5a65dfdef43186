"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a missing file, an unknown format, a shape that does not fit."""


def cause_line(error: BaseException) -> str:
    """What went wrong, in one line: the error and, down its chain, what caused it (a refused connection, a full
    disk, a gated repo), so that a wrapping message never hides the cause."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = " ".join(str(error).split())
        parts.append(f"{type(error).__name__}: {text}" if text else type(error).__name__)
        error = error.__cause__ or error.__context__
    return "; caused by ".join(parts)

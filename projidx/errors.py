"""The one exception type projidx raises for bad input; the CLI prints it as a one-line error."""


class ProjidxError(Exception):
    """A user-facing error: bad data, a mismatched store, a missing checkpoint, ..."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), for one-line errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

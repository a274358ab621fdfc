"""The one exception type projidx raises for bad input; the CLI prints it as a one-line error."""


class ProjidxError(Exception):
    """A user-facing error: bad data, a mismatched store, a missing checkpoint, ..."""

"""User-facing errors: one line that names the problem and the fix; the CLI turns them into exit code 2."""


class DfqError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class MissingDependencyError(DfqError):
    """An optional dependency is not installed; the message names the extra to install."""


class CollectiveError(DfqError):
    """A :class:`DfqError` raised alike on every rank of a ``torchrun`` job (the CLI prints it on rank 0 only)."""

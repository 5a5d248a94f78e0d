"""User-facing errors: one line that names the problem and the fix; the CLI turns them into exit code 2."""


class DfqError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class MissingDependencyError(DfqError):
    """An optional dependency is not installed; the message names the extra to install."""

"""User-facing errors.

A `UserError` is a mistake in what the user asked for (a missing file, an unknown config key, a
prompt the vocabulary cannot encode). The command-line scripts print its message on one line and
exit with status 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line that names the culprit."""

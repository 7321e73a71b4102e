"""The one exception type for mistakes the user can fix (bad path, option, data, checkpoint).

Its message is a single line that names the problem and the fix; the CLI prints it without a traceback.
Programming errors stay ordinary exceptions. ``UserError`` subclasses ``ValueError`` so library callers that catch
``ValueError`` for bad arguments keep working.
"""


class UserError(ValueError):
    """A problem with the user's input, configuration or files; the message says how to fix it."""

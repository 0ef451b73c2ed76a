"""The one exception type the CLI turns into a one-line message."""


class LorafitError(Exception):
    """Bad input (exit 2) or a runtime failure (exit 1), with a message that says how to fix it."""

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the terminal as a single line (no traceback) and the
process exits with status 2. Everything else is a bug in gluetune and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_USER_ERROR = 2
# What ends a line (str.splitlines), shown escaped: a message quotes the user's keys and values as given.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class UserError(Exception):
    """Bad input: a config typo, a missing file or column, a label out of range, ..."""

    exit_code = EXIT_USER_ERROR
    shared = False  # raised by every process of a multi-process run alike (only the main one says it)

    def __init__(self, message: object = "", *args):
        super().__init__(str(message).translate(_LINE_BREAKS), *args)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""

    exit_code = 3
    shared = True  # decided together (callbacks.LossWatch)


class RunInterrupted(UserError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can be resumed."""

    shared = True  # decided together (callbacks.GracefulStop)

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    def __reduce__(self):
        return type(self), (str(self), self.exit_code - 128)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_line(text: object) -> str:
    """The first non-empty line of an exception message, for wrapping library errors."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return str(text).strip()

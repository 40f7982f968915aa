"""One error family for user mistakes.

The CLI turns any `TransferkitError` into a single line on stderr and its `exit_code`;
library callers can catch it like any exception. Everything else is a bug and keeps its traceback.
"""


class TransferkitError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 1


class UsageError(TransferkitError):
    """A bad command-line value or API argument (unknown choice, out-of-range number)."""

    exit_code = 2


class DataError(TransferkitError):
    """The data folder cannot be used (missing, fewer than 2 classes, empty split, ...)."""

    exit_code = 3


class WeightsError(TransferkitError):
    """Pretrained weights are not available (offline and not cached) or a weights file is unsafe."""

    exit_code = 4


class CheckpointError(TransferkitError):
    """A checkpoint or run folder is missing, incomplete or not a transferkit checkpoint."""

    exit_code = 5


class TrainingError(TransferkitError):
    """Training cannot go on (non-finite loss, out of memory); the best checkpoint so far is kept."""

    exit_code = 6


class ExportError(TransferkitError):
    """An exported model disagrees with the eager model beyond tolerance, or export failed."""

    exit_code = 7
    result: dict | None = None  # a refused int8 model: the export of the float model it was made from, which stands

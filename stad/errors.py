"""The errors stad raises, and the exit code each one maps to.

Library code raises a subclass of :class:`StadError` with a message a user can act on
(what went wrong, which file or option, what to do). The CLI catches it in one place (the
root command group's ``invoke`` in :mod:`stad.cli`) and exits with the class's ``exit_code``;
the table of codes is in ``docs/exit-codes.md``. Anything that is not a ``StadError`` is a
bug and exits with 1.
"""

from __future__ import annotations

# Documented exit codes (docs/exit-codes.md). Keep this table and the docs in step.
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_ARTIFACT = 4
EXIT_PLUGIN = 5
EXIT_SKIPPED = 6
EXIT_ANOMALY = 10
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (128 + SIGPIPE, as a shell reports it)


class StadError(Exception):
    """Base class of every error stad reports to a user (exit code 1 unless a subclass says)."""

    exit_code: int = EXIT_UNEXPECTED


class UsageError(StadError):
    """Bad or conflicting options, or a config file that does not validate."""

    exit_code = EXIT_USAGE


class DataError(StadError):
    """Input data that cannot be used: unreadable images, missing roots, unpaired masks."""

    exit_code = EXIT_DATA


class ArtifactError(StadError):
    """A teacher or model artifact that is missing, corrupt, of the wrong kind or too new."""

    exit_code = EXIT_ARTIFACT


class PluginError(StadError):
    """A dataset adapter plugin that fails to import, is incompatible or fails while running."""

    exit_code = EXIT_PLUGIN


class TrainingError(StadError):
    """Training cannot go on (for instance a NaN loss); the message names the last checkpoint."""

    exit_code = EXIT_UNEXPECTED


class Interrupted(StadError):
    """The run was stopped by SIGINT/SIGTERM after saving what it had."""

    exit_code = EXIT_INTERRUPTED

"""Where output goes: results on stdout, messages and progress on stderr.

``--json`` output is JSON Lines: one object per line, each carrying ``schema_version`` so that
scripts can check what they parse. Progress bars (rich) appear only when stderr is a terminal
and ``-q`` was not given. Where stderr is a log or a pipe, a long task writes a plain progress
line instead (:class:`_LineTask`): none for a task that ends within :data:`LINE_MIN_GAP`
seconds, so short runs leave clean logs, and a fit of hours on a slow CPU is not silent.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

SCHEMA_VERSION = 1
LINE_MIN_GAP = 30.0
"""Seconds from a task's start, and between two of its progress lines, before a line is written."""
LINE_HEARTBEAT = 300.0
"""Seconds after which a line is written even where no tenth of the task was completed since."""


@dataclass
class _State:
    quiet: bool = False
    debug: bool = False
    follower: bool = False  # a rank other than 0 of a distributed run: rank 0 speaks for it


state = _State()


def stderr() -> Console:
    """A console on stderr (created per call so that tests capturing stderr see it)."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 when the reader has gone; stad's commands exit 141 then
        # (stad.cli._StadGroup.invoke), whatever printed.
        self.quiet = True
        raise BrokenPipeError


def stdout() -> Console:
    return _Console(file=sys.stdout, highlight=False, soft_wrap=True)


def message(text: str) -> None:
    """A note for the user on stderr (suppressed by ``-q``)."""
    if not state.quiet and not state.follower:
        stderr().print(text, markup=False)


def warn(text: str) -> None:
    """A warning on stderr (shown even with ``-q``)."""
    if not state.follower:
        print(f"warning: {text}", file=sys.stderr)


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; emit null rather than invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: object) -> str:
    """``text`` on one line: control characters (a newline, a tab, a terminal escape in a file
    name or a message), line and paragraph separators and bidirectional overrides written as
    escapes (``\\n``, ``\\t``, ``\\x1b``), so that no name can start a line of its own,
    shift a column, reorder what is shown or drive the terminal. Every other character,
    non-breaking and ideographic spaces and joiners included, is kept."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp")
                   or c in _BIDI_CONTROLS else c for c in str(text))


def json_line(record: dict[str, Any]) -> str:
    """One JSON Lines record (no newline), with ``schema_version`` first."""
    return json.dumps(_clean({"schema_version": SCHEMA_VERSION, **record}), default=str)


def emit_json(record: dict[str, Any]) -> None:
    """Write one JSON Lines record to stdout, with ``schema_version`` first."""
    line = json_line(record)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Reporter:
    """Progress reporting handed to library functions: a rich display, plain lines (``lines``),
    or silence (the library's :data:`NULL_REPORTER`).

    Library code calls :meth:`task` to get a handle and ``advance`` on it; it never imports
    rich itself, so it runs the same under tests, pipes and torchrun.
    """

    def __init__(self, progress: Progress | None = None, *, lines: bool = False,
                 clock: Callable[[], float] | None = None) -> None:
        self._progress = progress
        self._lines, self._clock = lines, clock or time.monotonic

    def task(self, description: str, total: int) -> _Task:
        if self._lines:
            return _LineTask(description, total, self._clock)
        task_id = None
        if self._progress is not None:
            task_id = self._progress.add_task(description, total=total, info="")
        return _Task(self._progress, task_id)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False)
        else:
            message(text)


class _Task:
    def __init__(self, progress: Progress | None, task_id: Any) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, n: int = 1, **info: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._id, advance=n, info=_info(info))

    def done(self) -> None:
        if self._progress is not None:
            self._progress.update(self._id, visible=False)


def _info(info: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in info.items())


def _duration(seconds: float) -> str:
    """``45 s`` (under 2 minutes), ``12 min``, ``2 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class _LineTask(_Task):
    """Progress as plain lines on stderr, for logs and pipes: one when a tenth of the task was
    completed, or :data:`LINE_HEARTBEAT` seconds passed, since the last, but never within
    :data:`LINE_MIN_GAP` seconds of the task's start or of the last line. The time left is
    the rate of this run's steps (a resumed run's skipped steps do not count) applied to
    those to come."""

    def __init__(self, description: str, total: int, clock: Callable[[], float]) -> None:
        super().__init__(None, None)
        self._description, self._total, self._clock = description, max(total, 1), clock
        self._done = 0
        self._start = self._last = clock()
        self._last_tenth = 0
        self._base: tuple[float, int] | None = None  # (time, count) of the first advance

    def advance(self, n: int = 1, **info: Any) -> None:
        self._done += n
        now = self._clock()
        if self._base is None:
            self._base = (now, self._done)
            return
        tenth = 10 * self._done // self._total
        if now - self._last < LINE_MIN_GAP or (
                tenth <= self._last_tenth and now - self._last < LINE_HEARTBEAT):
            return
        self._last, self._last_tenth = now, tenth
        t0, n0 = self._base
        left = ""
        if self._done > n0 and self._done < self._total:
            rate = (self._done - n0) / max(now - t0, 1e-9)
            left = f", about {_duration((self._total - self._done) / rate)} left"
        extra = _info(info)
        message(f"{self._description}: {self._done}/{self._total} "
                f"({100 * self._done / self._total:.0f} %), {_duration(now - self._start)}"
                f"{left}" + (f"  {extra}" if extra else ""))


@contextmanager
def reporter() -> Iterator[Reporter]:
    """A :class:`Reporter` with a live rich progress display when stderr is a terminal, plain
    progress lines for long tasks where it is not (:class:`_LineTask`), nothing with ``-q``."""
    if state.quiet:
        yield Reporter(None)
        return
    if not sys.stderr.isatty():
        yield Reporter(None, lines=True)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr(),
        transient=True,
    )
    with progress:
        yield Reporter(progress)


class _LoggedReporter(Reporter):
    """No progress, and notes to the ``stad`` logger at INFO (not shown unless the caller
    configures :mod:`logging`): what the library's functions report by default, so that
    ``import stad`` writes nothing to a program's stderr but its warnings."""

    def note(self, text: str) -> None:
        logging.getLogger("stad").info(text)


NULL_REPORTER: Reporter = _LoggedReporter(None)

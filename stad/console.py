"""Where output goes: results on stdout, messages and progress on stderr.

``--json`` output is JSON Lines: one object per line, each carrying ``schema_version`` so that
scripts can check what they parse. Progress bars (rich) appear only when stderr is a terminal
and ``-q`` was not given, so logs and pipes stay clean.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
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


@dataclass
class _State:
    quiet: bool = False
    debug: bool = False
    follower: bool = False  # a rank other than 0 of a distributed run: rank 0 speaks for it


state = _State()


def stderr() -> Console:
    """A console on stderr (created per call so that tests capturing stderr see it)."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def stdout() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


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


def json_line(record: dict[str, Any]) -> str:
    """One JSON Lines record (no newline), with ``schema_version`` first."""
    return json.dumps(_clean({"schema_version": SCHEMA_VERSION, **record}), default=str)


def emit_json(record: dict[str, Any]) -> None:
    """Write one JSON Lines record to stdout, with ``schema_version`` first."""
    line = json_line(record)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Reporter:
    """Progress reporting handed to library functions; silent unless attached to a terminal.

    Library code calls :meth:`task` to get a handle and ``advance`` on it; it never imports
    rich itself, so it runs the same under tests, pipes and torchrun.
    """

    def __init__(self, progress: Progress | None = None) -> None:
        self._progress = progress

    def task(self, description: str, total: int) -> _Task:
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
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in info.items())
            self._progress.update(self._id, advance=n, info=text)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.update(self._id, visible=False)


@contextmanager
def reporter() -> Iterator[Reporter]:
    """A :class:`Reporter` with a live rich progress display when stderr is a terminal."""
    if state.quiet or not sys.stderr.isatty():
        yield Reporter(None)
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


NULL_REPORTER = Reporter(None)

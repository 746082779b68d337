"""Training you can watch: ``--log-dir DIR`` writes the losses of ``pretrain-teacher`` and
``fit-students`` as TensorBoard scalars while they run (``tensorboard --logdir DIR``).

Every progress task of a run (``teacher p=17``, ``students p=33``, ...) becomes a tag prefix;
each step's numbers (``loss``, and ``epoch`` for the students) are written under it at the
task's step, counted from where a resumed run starts. Only the first process of a distributed
run writes. Needs the ``tensorboard`` extra (``pip install 'stad[tensorboard]'``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stad.console import Reporter
from stad.errors import UsageError
from stad.fsutil import check_output_dir

EXTRA = "pip install 'stad[tensorboard]'"


class _Task:
    def __init__(self, inner: Any, writer: Any, tag: str) -> None:
        self._inner, self._writer, self._tag, self._step = inner, writer, tag, 0

    def advance(self, n: int = 1, **info: Any) -> None:
        self._step += n
        for key, value in info.items():
            if isinstance(value, float | int) and not isinstance(value, bool):
                self._writer.add_scalar(f"{self._tag}/{key}", value, self._step)
        self._inner.advance(n, **info)

    def done(self) -> None:
        self._writer.flush()
        self._inner.done()


class ScalarLog(Reporter):
    """A :class:`~stad.console.Reporter` that also writes every task's numbers to TensorBoard."""

    def __init__(self, inner: Reporter, writer: Any) -> None:
        super().__init__(None)
        self._inner, self._writer = inner, writer

    def task(self, description: str, total: int) -> Any:
        tag = description.replace(" ", "_").replace("=", "")  # "teacher p=17" → "teacher_p17"
        return _Task(self._inner.task(description, total), self._writer, tag)

    def note(self, text: str) -> None:
        self._inner.note(text)


@contextmanager
def tensorboard_log(reporter: Reporter, log_dir: Path | None) -> Iterator[Reporter]:
    """``reporter``, writing TensorBoard scalars to ``log_dir`` too (None: ``reporter`` as
    is). A missing tensorboard package is a one-line usage error naming the extra."""
    if log_dir is None or int(os.environ.get("RANK", "0") or "0") != 0:
        yield reporter
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f"--log-dir writes TensorBoard logs and needs tensorboard: {EXTRA}"
                         ) from None
    check_output_dir(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        yield ScalarLog(reporter, writer)
    finally:
        writer.close()

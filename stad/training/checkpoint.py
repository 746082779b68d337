"""Checkpoints of training runs, and the signals that stop them (docs/usage.md, "Interrupted
runs and resuming").

``pretrain-teacher`` and ``fit-students`` write a ``checkpoint`` artifact beside their output
(:func:`checkpoint_path`: ``model.safetensors`` → ``model.ckpt.safetensors``) every
``checkpoint_every`` iterations / epochs, at the end of every scale but the last, and when
SIGINT or SIGTERM arrives. It goes through :mod:`stad.artifacts` like any artifact (safetensors,
digest, atomic replace), so a crash or a second Ctrl-C while saving leaves the previous file.

Tensor names (``P`` a patch size, ``m`` a student, ``i`` an optimizer parameter index):

===============================  ==============================================================
``teacher.pP.*``                 pretrain-teacher: the teacher of a finished scale, or of the
                                 scale in progress
``decoder.pP.*``                 its distillation decoder (in progress, with a backbone)
``generator.pP``                 (5056,) uint8: the state of the scale's ``torch.Generator``
``losses.pP``                    (iterations done, 4) float64: total, kd, metric, compact
``student.pP.m.*``               fit-students: students of a finished scale or in progress
``norm.pP.mean`` / ``.std``      the target normalization of a finished scale
``adam.pP.i.{step,exp_avg,..}``  Adam's state of the scale in progress
===============================  ==============================================================

The metadata adds to the artifact's (``stad.config`` holds the resolved settings) ``stad.info``
with ``command``, ``identity`` (the data trained on: image names and a hash of their bytes, and
the teacher or backbone weights), ``finished`` (per finished scale, its info), ``progress``
(where the scale in progress stands, or ``null`` between scales) and ``where`` (in words).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from stad import console
from stad.artifacts import Artifact, finite_number, load_artifact, prefixed, save_artifact
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.distributed import World
from stad.errors import ArtifactError, DataError, Interrupted, TrainingError, UsageError
from stad.fsutil import read_regular_file

SUFFIX = ".ckpt.safetensors"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Which settings table each command trains from.
SECTIONS = {"pretrain-teacher": "teacher", "fit-students": "students"}
# Settings that may change between an interrupted run and its resumption: they do not change
# the result (the data itself is compared by content, so a moved --root is fine).
MAY_DIFFER = frozenset({"root", "device", "teacher.checkpoint_every", "students.checkpoint_every",
                        "students.preset", "teacher.backbone_weights", "teacher.init",
                        # a pretraining run may be extended (or ended early) on resume: with a
                        # constant learning rate, N then M more iterations are N + M in one
                        # go; stad.training.teacher refuses what cannot be honoured
                        "teacher.iterations"})


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    """The checkpoint of the run that writes ``out``, in the same folder.

    ``model.safetensors`` → ``model.ckpt.safetensors``; another suffix is kept:
    ``model.st`` → ``model.st.ckpt.safetensors``.
    """
    out = Path(out)
    stem = out.name.removesuffix(".safetensors") or out.name
    return out.with_name(stem + SUFFIX)


# --- stopping on a signal ----------------------------------------------------------------------


class StopFlag:
    """Whether a stop was asked for; training loops call :meth:`poll` once after every step.

    A first SIGINT/SIGTERM only sets the flag (the loop finishes its step, saves and raises
    :class:`~stad.errors.Interrupted`). A second one while a checkpoint is being saved is held
    back until the save is complete; a second one at any other moment raises
    ``KeyboardInterrupt`` at once (exit 130, the last checkpoint on disk stays as it was).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._shielded = 0

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "request"

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask the loop to stop after its current step (what the signal handler does)."""
        if self.signal is None:
            self.signal = signum

    def poll(self) -> bool:
        """True when the loop should save and stop; called exactly once per training step."""
        return self.requested

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A block (saving a checkpoint) that a second signal does not break into."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.request(signum)
            _say(f"stad: {self.name}: stopping after the current step to save a checkpoint "
                 "(a second signal stops at once, without saving)")
        elif self._shielded:
            _say("stad: saving the checkpoint; stopping as soon as it is written")
        else:
            raise KeyboardInterrupt


def _say(text: str) -> None:
    # A signal handler may run while rich holds the console: write the raw fd, not through it.
    if console.state.quiet or console.state.follower:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(2, f"\n{text}\n".encode())


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag | None = None) -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to ``flag`` (a new one by default) inside the block.

    The previous handlers are restored on exit. Off the main thread Python cannot install
    handlers; the flag is then only set by :meth:`StopFlag.request`.
    """
    flag = flag if flag is not None else StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        for s in SIGNALS:
            signal.signal(s, flag.handle)
        yield flag
    finally:
        for s, handler in previous.items():
            # None: a handler not installed from Python; the default is the closest we can do.
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# --- the checkpoint of one run -----------------------------------------------------------------


@dataclass
class Checkpoint:
    """Where and how often a training loop saves, what it resumes from, and its stop flag.

    The loops in :mod:`stad.training.teacher` and :mod:`stad.training.students` call
    :meth:`save` with the state of the scale in progress; :meth:`finish` adds a finished
    scale, which every later save carries along. ``resumed`` is the validated checkpoint to
    continue, if any.
    """

    path: Path
    every: int
    command: str = "fit-students"
    config: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    resume_command: str = "run it again with --resume (resume=True in Python)"
    stop: StopFlag = field(default_factory=StopFlag)
    resumed: Artifact | None = None
    last: str | None = None  # where the checkpoint on disk stands, for messages
    writer: bool = True  # False on ranks > 0 of a distributed run: only rank 0 writes
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _finished: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _started: float = field(default_factory=time.perf_counter, init=False, repr=False)

    def seconds(self, since: float | None = None) -> float:
        """The run's time so far: since ``since`` (a ``time.perf_counter()``; else since this
        checkpoint was opened) in this process, plus what the runs it resumes recorded."""
        info = self.resumed.info if self.resumed is not None else {}
        before = info.get("seconds")
        if before is None:  # a checkpoint of an older stad: what its scales recorded
            finished = info.get("finished") if isinstance(info.get("finished"), dict) else {}
            progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
            before = sum(v for v in [*(s.get("seconds") for s in finished.values()
                                       if isinstance(s, dict)), progress.get("seconds")]
                         if finite_number(v) and v > 0)
        earlier = float(before) if finite_number(before) and before > 0 else 0.0
        return earlier + time.perf_counter() - (self._started if since is None else since)

    @property
    def progress(self) -> dict[str, Any] | None:
        """The resumed checkpoint's scale in progress (``{"scale": P, ...}``), if any."""
        return self.resumed.info.get("progress") if self.resumed is not None else None

    def resumed_scale(self, name: str) -> dict[str, Any] | None:
        """The info of scale ``name`` (``"p17"``) if the resumed checkpoint finished it."""
        return self.resumed.info.get("finished", {}).get(name) if self.resumed else None

    def finish(self, name: str, tensors: Mapping[str, torch.Tensor], info: dict[str, Any]) -> None:
        self._tensors.update(tensors)
        self._finished[name] = info

    def save(self, tensors: Mapping[str, torch.Tensor], progress: dict[str, Any] | None, *,
             where: str) -> None:
        """Write the finished scales plus ``tensors`` (the scale in progress) atomically."""
        artifact = Artifact(
            kind="checkpoint", tensors={**self._tensors, **tensors}, config=self.config,
            preprocessing=self.preprocessing, seed=self.seed,
            info={"command": self.command, "identity": self.identity,
                  "finished": self._finished, "progress": progress, "where": where,
                  "seconds": round(self.seconds(), 1)})
        if self.writer:
            with self.stop.shielded():
                save_artifact(self.path, artifact)
        self.last = where

    def interrupted(self, where: str) -> Interrupted:
        return Interrupted(f"stopped by {self.stop.name} at {where}; checkpoint saved to "
                           f"{self.path}. To continue: {self.resume_command}")

    def remove(self) -> None:
        if self.writer:
            self.path.unlink(missing_ok=True)


def last_good(checkpoint: Checkpoint | None) -> str:
    """For error messages: the last good checkpoint, or that there is none yet."""
    if checkpoint is None or checkpoint.last is None:
        return "no checkpoint has been saved yet"
    return f"the last good checkpoint is {checkpoint.path} ({checkpoint.last})"


def stop_requested(checkpoint: Checkpoint | None, world: World, device: torch.device) -> bool:
    """Whether a stop was asked for in any process (a collective: every rank calls it at the
    same step); False without a checkpoint."""
    return checkpoint is not None and world.any(checkpoint.stop.poll(), device)


def save_or_stop(checkpoint: Checkpoint | None, *, stop: bool, last: bool, due: bool,
                 save: Callable[[], str]) -> None:
    """The end of a training step of either loop: unless it was the last, ``save()`` (which
    checkpoints and returns where, in words) when a save is ``due`` or a ``stop`` was asked
    for, and after a stop raise :class:`~stad.errors.Interrupted`."""
    if checkpoint is None or last or not (stop or due):
        return
    where = save()
    if stop:
        raise checkpoint.interrupted(where)


def check_finite(ok: bool, world: World, device: torch.device, checkpoint: Checkpoint | None,
                 message: str) -> None:
    """Raise :class:`~stad.errors.TrainingError` (``message`` and the last good checkpoint)
    when the loss is not finite in any process."""
    if world.any(not ok, device):
        raise TrainingError(f"{message}; {last_good(checkpoint)}")


def open_checkpoint(
    out: str | os.PathLike[str],
    *,
    command: str,
    settings: Settings,
    identity: dict[str, Any],
    preprocessing: dict[str, Any],
    resume: bool,
    resume_command: str,
    reporter: Reporter = NULL_REPORTER,
) -> Checkpoint:
    """The checkpoint of a run of ``command`` writing ``out``, checked for resuming.

    With ``resume`` and a checkpoint present it is loaded and must match (else
    :class:`UsageError` naming what differs); with ``resume`` and none present the run starts
    afresh with a note. Without ``resume`` an existing checkpoint is noted and will be replaced.
    """
    section = SECTIONS[command]
    checkpoint = Checkpoint(
        path=checkpoint_path(out), every=getattr(settings, section).checkpoint_every,
        command=command, config=settings.model_dump(mode="json"), identity=identity,
        preprocessing=preprocessing, seed=settings.seed, resume_command=resume_command)
    path = checkpoint.path
    if not path.exists():
        if resume:
            reporter.note(f"nothing to resume: no checkpoint {path}; starting afresh")
        return checkpoint
    if not resume:
        reporter.note(f"{path} holds an interrupted run; starting afresh and replacing it "
                      "(pass --resume, or resume=True in Python, to continue it instead)")
        return checkpoint
    try:
        saved = load_artifact(path, kind="checkpoint")
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; delete it to start afresh") from None
    found = saved.info.get("command")
    if found != command:
        raise UsageError(f"{path} is a checkpoint of `stad {found}`, not of `stad {command}`; "
                         "write to another file (--out, out=) or delete it")
    differences = (setting_differences(saved.config, checkpoint.config, section)
                   + identity_differences(saved.info.get("identity", {}), identity))
    if differences:
        raise UsageError(f"cannot resume from {path}: it was made with other settings or data "
                         f"({'; '.join(differences)}). Resume with the same ones, or run "
                         "again without --resume (resume=False in Python) to start afresh, which "
                         "replaces the checkpoint")
    checkpoint.resumed = saved
    checkpoint.last = saved.info.get("where", "unknown progress")
    reporter.note(f"resuming from {path} ({checkpoint.last})")
    return checkpoint


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def setting_differences(saved: Mapping[str, Any], now: Mapping[str, Any],
                        section: str) -> list[str]:
    """``key: A in the checkpoint, B now`` for every setting that changes the result.

    Compared: the top-level settings and the command's table, except :data:`MAY_DIFFER`.
    """
    def relevant(config: Mapping[str, Any]) -> dict[str, Any]:
        flat = _flatten({k: v for k, v in config.items()
                         if k == section or not isinstance(v, Mapping)})
        return {k: v for k, v in flat.items() if k not in MAY_DIFFER}

    a, b = relevant(saved), relevant(now)
    return [f"{key}: {a.get(key)!r} in the checkpoint, {b.get(key)!r} now"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "images" and isinstance(a, Mapping) and isinstance(b, Mapping) and (
                "listing_sha256" in a or "listing_sha256" in b):
            out.append(f"{a.get('count', len(a.get('names', [])))} training images listed in "
                       f"the checkpoint, {b.get('count', len(b.get('names', [])))} now; names, "
                       "sizes or modification times changed")
        elif key == "images" and isinstance(a, Mapping) and isinstance(b, Mapping):
            out.append(_image_difference(list(a.get("names", [])), list(b.get("names", []))))
        else:
            out.append(f"the {key} weights differ")
    return out


def _image_difference(a: list[str], b: list[str]) -> str:
    if a == b:
        return f"the same {len(a)} training images by name, but their contents changed"
    gone = [x for x in a if x not in set(b)]
    new = [x for x in b if x not in set(a)]
    text = f"{len(a)} training images in the checkpoint, {len(b)} now"
    if gone:
        text += f"; missing now: {', '.join(gone[:3])}" + (" ..." if len(gone) > 3 else "")
    if new:
        text += f"; new: {', '.join(new[:3])}" + (" ..." if len(new) > 3 else "")
    if not gone and not new:
        text += "; the same images in another order"
    return text


# --- identities and optimizer state ------------------------------------------------------------


def images_identity(names: Sequence[str], paths: Sequence[str | os.PathLike[str]]
                    ) -> dict[str, Any]:
    """The images trained on: their names (in order) and a SHA-256 over names and bytes."""
    h = hashlib.sha256()
    for name, path in zip(names, paths, strict=True):
        try:
            data = read_regular_file(path)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return {"names": list(names), "sha256": h.hexdigest()}


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 over named tensors (for the weights a run starts from)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """The per-parameter state of ``optimizer`` (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``)
    as ``{prefix}.{i}.{key}`` tensors; the hyper-parameters come from the settings."""
    out = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{i}.{key}"] = (value if isinstance(value, torch.Tensor)
                                          else torch.tensor(float(value)))
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                   prefix: str) -> None:
    """Restore what :func:`optimizer_tensors` saved into a freshly built ``optimizer``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in prefixed(tensors, prefix).items():
        index, key = name.split(".", 1)
        # A copy: the optimizer updates its state in place.
        state.setdefault(int(index), {})[key] = value.clone()
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})

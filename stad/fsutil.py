"""Atomic file writes and output locks: an interrupted run leaves the old file or none.

Every file stad produces (artifacts, checkpoints, reports, maps) goes through
:func:`atomic_write_bytes` or :func:`atomic_path`: the data is written to a temporary file in
the same folder, flushed to disk, then moved over the target with :func:`os.replace`, which is
atomic on POSIX and Windows. Readers therefore see either the complete old file or the complete
new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from stad.errors import UsageError

# A write that failed for want of space (or quota): the user's to fix, not a bug to report.
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # EDQUOT: not on every OS


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path`` atomically.

    If the body raises (or the process dies), the temporary file is removed (or left as a
    hidden ``.tmp`` file that no reader looks at) and ``path`` is untouched.
    """
    target = check_output_file(path, create=True)
    try:
        # the name cut short in the temporary's, so that a legal long name stays writable
        fd, tmp_name = tempfile.mkstemp(prefix=f".{short_name(target.name, 100)}.", suffix=".tmp",
                                        dir=target.parent)
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        # mkstemp makes the file 0600; give it the mode open() would: the old file's, or
        # 0666 less the umask, so that another user or a CI job can read what stad wrote.
        # After writing, so that a read-only mode does not stop the write.
        os.chmod(tmp, _mode_of(target))
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise _cannot_write(target, exc) from None  # not a bug to report
        raise


def _cannot_write(target: Path, exc: OSError) -> UsageError:
    """The one-line error for an output that could not be written; a full disk (or quota)
    says what to do, and that the file there before is intact."""
    if exc.errno in DISK_FULL:
        return UsageError(f"cannot write {target}: {exc.strerror}; free space on its disk or "
                          "choose another output path (the file there, if any, is unchanged)")
    return UsageError(f"cannot write {target}: {exc.strerror}")


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:  # Linux: no side effect
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _mode_of(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _make_dir(folder: Path, what: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder must be, no permission, ...
        raise UsageError(f"cannot create the folder of {what}: {exc.strerror} ({folder}); "
                         "choose another output path") from None


def check_output_file(path: str | os.PathLike[str], *,
                      inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
                      in_place: bool = False, create: bool = False) -> Path:
    """Make sure a file can be written at ``path``, before any work, and return the file to
    write: ``path``, or the file a symbolic link there points to (written through, as
    ``open`` would, not replaced by a file of its own). Its folder is made only with
    ``create`` (when the file is written), so that a run that fails first leaves none.

    ``inputs`` names the files the run reads by their option (``{"--model": path}``): writing
    over one of them would lose it, so ``path`` may not be any of them. Without ``in_place``
    the file is replaced whole (:func:`atomic_path`), so a device, FIFO or socket there is
    refused: the rename would put a file in its place (``/dev/null`` among them, as root).
    ``in_place``: the file is opened and written (``score --output``), so any of them will do.

    Raises:
        UsageError: ``path`` is a folder or one of ``inputs``, a device, FIFO or socket to be
            replaced, or its folder cannot be created or written in.
    """
    target = Path(path)
    for option, source in (inputs or {}).items():
        if source is not None and same_path(target, Path(source)):
            raise UsageError(f"output {target} is the {option} file itself; writing there would "
                             "lose it: give another file")
    kind = _kind(target)
    if kind == "folder":
        raise UsageError(f"output {target} is a folder; give a file name")
    if kind == "special" and not in_place:
        raise UsageError(f"output {target} is a device, FIFO or socket, not a regular file; "
                         "stad writes a new file and moves it there, which would replace it: "
                         "give a file name")
    if kind != "special" and os.path.islink(target):  # (a link to a device is opened as is)
        with _PINNED_LOCK:  # where this process's lock on the link put it, if it holds one
            pinned = _PINNED.get(os.path.abspath(target))
        target = pinned or Path(os.path.realpath(target))
    _ready(target.parent, target, create)
    return target


# An output named through a link, resolved once when it is locked (output path as given, made
# absolute → the file the lock holds), so that the write goes to the file locked even if the
# link is pointed elsewhere meanwhile (a deploy that flips `current.safetensors`).
_PINNED: dict[str, Path] = {}
_PINNED_LOCK = threading.Lock()


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one existing file (through links, hard or symbolic: the
    same device and inode); False where either is missing or cannot be read."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (the same path resolved, or the same file through
    a link)."""
    try:
        resolved = a.resolve() == b.resolve()
    except OSError:  # unreadable, a loop of links: not provably the same path
        resolved = False
    return resolved or same_file(a, b)


def check_output_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Make sure ``path`` is (or can be created as) a folder, before any work; without
    ``create`` it is left to be made by the first file written in it (:func:`atomic_path`),
    so that a run that fails before leaves no empty folder."""
    folder = Path(path)
    if _kind(folder) in ("file", "special"):
        raise UsageError(f"output folder {folder} is a file; give a folder")
    _ready(folder, folder, create)
    return folder


def _ready(folder: Path, what: Path, create: bool) -> None:
    """``folder`` made (with ``create``) or, without, the nearest folder above it that
    exists found writable (and not a file), so that making it later can succeed."""
    if create:
        _make_dir(folder, what)
        _check_writable(folder)
        return
    probe = folder
    while (kind := _kind(probe)) is None and probe.parent != probe:
        if os.path.islink(probe):  # a link to nothing: no folder can be made through it
            raise UsageError(f"cannot create the folder of {what}: {probe} is a link to "
                             f"nothing ({os.readlink(probe)}); create that or choose another "
                             "output path")
        probe = probe.parent
    if kind != "folder":
        raise UsageError(f"cannot create the folder of {what}: {probe} is not a folder "
                         f"({folder}); choose another output path")
    _check_writable(probe)


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in the folder {folder}: no permission; choose another "
                         "output path")


def _kind(path: Path) -> str | None:
    """"folder", "file" (a regular file), "special" (a device, FIFO or socket) or None (nothing
    there, or a parent that is not a folder: :func:`_make_dir` says so); through links. A
    name too long for the file system is a :class:`UsageError` here, whatever
    ``Path.exists`` makes of it on this Python."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"cannot write {path}: {exc.strerror}; choose a shorter name"
                             ) from None
        return None
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "special"


def short_name(name: str, limit: int) -> str:
    """``name`` if it takes at most ``limit`` bytes on the file system, else its longest start
    that leaves room for ``-`` and 12 hex digits of its SHA-256 (so that names stay apart): for
    the lock and temporary files beside an output, whose names add to the output's."""
    if len(os.fsencode(name)) <= limit:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    start = name
    while len(os.fsencode(start)) > limit - 13:
        start = start[:-1]
    return f"{start}-{digest}"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class NotARegularFile(OSError):
    """A FIFO, device or socket where a file is read: reading it could block or never end."""


def read_regular_file(path: str | os.PathLike[str], *, allow_fifo: bool = False) -> bytes:
    """The bytes of the regular file ``path`` (a link to one is fine).

    Raises the ``OSError`` of reaching it (``FileNotFoundError``, ``IsADirectoryError``, ...)
    or :class:`NotARegularFile`, whose ``strerror`` says so, for a FIFO, device or socket,
    found by ``stat`` before the file is opened (opening a device can act; a FIFO would wait
    for a writer for ever, ``/dev/zero`` fill the memory). ``allow_fifo``: a pipe is read too
    (``--config <(...)``, a config piped to ``/dev/stdin``): the user's own input.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not (stat.S_ISREG(mode) or (allow_fifo and stat.S_ISFIFO(mode))):
        raise NotARegularFile(errno.EINVAL, "not a regular file (a FIFO, device or socket)",
                              str(path))
    flags = os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    if stat.S_ISREG(mode):  # never blocks; a FIFO opened so would read nothing
        flags |= getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        if not (stat.S_ISREG(now.st_mode) or (allow_fifo and stat.S_ISFIFO(now.st_mode))):
            # replaced between the stat and the open
            raise NotARegularFile(errno.EINVAL, "not a regular file (a FIFO, device or socket)",
                                  str(path))
        return f.read()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, harmless to skip.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (via a hidden ``.NAME.lock`` beside it) or refuse.

    Two runs writing the same artifact would otherwise interleave checkpoints; the second
    one gets a :class:`UsageError` naming the lock instead of waiting. The lock file is
    removed when the run ends (successfully or not), so none is left beside the artifact.
    Removing it is safe because a run that locked a file which is no longer the one at
    ``lock_path`` (removed by the run before it) opens the path afresh and locks that.
    """
    # Only the lock's own check (the write checks what it needs); through a link, the lock
    # goes beside the file it points to, where runs that name that file put theirs.
    target = check_output_file(path, in_place=True, create=True)
    if _kind(target) == "special":  # /dev/stdout, a FIFO: no file to keep whole or resume
        yield
        return
    # room for the dot and the suffix within a file system's 255 bytes
    lock_path = target.with_name(f".{short_name(target.name, 200)}.lock")
    for _ in range(100):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only folder, a lock file of another user
            raise UsageError(f"cannot write {lock_path}, the lock of {target}: {exc.strerror}; "
                             "choose another output path") from None
        try:
            _lock(fd, target, lock_path)
            if _same_file(fd, lock_path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file the previous holder had already removed: again
    else:  # pragma: no cover - only if other runs keep removing it under us
        raise UsageError(f"cannot lock {lock_path}: it keeps being replaced; try again")
    given = os.path.abspath(path)
    with _PINNED_LOCK:
        pinned = given not in _PINNED and os.path.abspath(target) != given
        if pinned:
            _PINNED[given] = target
    try:
        yield
    finally:
        if pinned:
            with _PINNED_LOCK:
                _PINNED.pop(given, None)
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_path):  # ours, not one put there since
                os.unlink(lock_path)  # while still holding the lock
        os.close(fd)


def _lock(fd: int, target: Path, lock_path: Path) -> None:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - Windows: no advisory locks, run unguarded
        pass
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise UsageError(
                f"{target} is being written by another stad run (lock {lock_path}); "
                "wait for it to finish or write to another file"
            ) from None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def cache_dir() -> Path:
    """Where stad keeps generated data (``$STAD_CACHE``, else ``$XDG_CACHE_HOME/stad``)."""
    if os.environ.get("STAD_CACHE"):
        return Path(os.environ["STAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stad"

"""Images for patch sampling: all of them in memory, or a refreshed buffer over a stream.

Teacher pretraining draws random patches from decoded images. When a process's share of the
training images fits in ``capacity`` images, every image is decoded once and kept (as before
collections existed). When it does not, the buffer holds ``capacity`` decoded images and, at
every iteration, :meth:`ImageBuffer.refresh` puts ``refresh`` newly decoded images of the
stream into slots drawn from the caller's generator (a shuffle buffer: an image stays for
about capacity / refresh iterations, so patches of a window of the stream much longer than the
buffer are mixed). The stream is decoded ahead in a background thread and starts again at its
first image when it ends. Each image is decoded once per visit, never once per patch, and
memory is ``capacity`` images plus a few decoded ahead, whatever the size of the collection.

The buffer's state is the stream position of the image in every slot and the position read
next (:meth:`ImageBuffer.state`); a checkpointed run that restores it (and its generator)
continues with the same images, so a resumed run matches an uninterrupted one.

In a stream, an image that cannot be decoded is skipped and counted (a crawl of millions of
files has a few; stopping hours into a run for one would lose more than it saves); when every
image fits in memory an unreadable one is a :class:`~stad.errors.DataError`, as elsewhere.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stad.console import NULL_REPORTER, Reporter
from stad.datasets.base import Sample
from stad.distributed import SINGLE, World
from stad.errors import DataError
from stad.images import load_image, to_tensor

SKIPPED_SHOWN = 5  # unreadable images named in the info (the rest are counted)


@dataclass(frozen=True)
class ImageSource:
    """Training images listed again on demand rather than held: ``open()`` yields them in a
    stable order, ``count`` says how many there are, ``name`` where they are (for messages)."""

    open: Callable[[], Iterator[Sample]]
    count: int
    name: str = "the training images"

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> ImageSource:
        return cls(open=lambda: iter(samples), count=len(samples))


def load_images(samples: Sequence[Sample], size: int, *, reporter: Reporter = NULL_REPORTER
                ) -> torch.Tensor:
    """Every image decoded once, resized to size×size and standardized: (N, 3, size, size).

    Memory is N · 3 · size² · 4 bytes (0.75 MiB per image at 256).
    """
    task = reporter.task("teacher: reading images", len(samples))
    out = torch.empty(len(samples), 3, size, size)
    for k, sample in enumerate(samples):
        out[k] = _decode(sample, size)
        task.advance(1)
    task.done()
    return out


def _decode(sample: Sample, size: int) -> torch.Tensor:
    return to_tensor(load_image(sample.image), size=size)


class _Reader:
    """A thread that decodes a rank's share of the stream ahead, from a position, round and
    round; items are (position, tensor) or an exception to raise in the caller."""

    def __init__(self, share: Callable[[int], Iterator[tuple[int, Sample]]], n: int, size: int,
                 start: int, ahead: int, name: str) -> None:
        self._share, self._n, self._size, self._name = share, n, size, name
        self._queue: queue.Queue[tuple[int, torch.Tensor] | BaseException] = queue.Queue(ahead)
        self._stop = threading.Event()
        self.skipped: list[str] = []
        self.n_skipped = 0
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True,
                                        name="stad-stream")
        self._thread.start()

    def _put(self, item: tuple[int, torch.Tensor] | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, start: int) -> None:
        try:
            failed_in_a_row = 0
            while not self._stop.is_set():
                listed = 0
                for pos, sample in self._share(start):
                    listed += 1
                    try:
                        tensor = _decode(sample, self._size)
                    except DataError as exc:
                        self.n_skipped += 1
                        if len(self.skipped) < SKIPPED_SHOWN:
                            self.skipped.append(str(exc))
                        failed_in_a_row += 1
                        if failed_in_a_row >= self._n:
                            raise DataError(f"none of the {self._n} images of this process's "
                                            f"share of {self._name} could be read, for "
                                            f"instance: {exc}") from None
                        continue
                    failed_in_a_row = 0
                    if not self._put((pos, tensor)):
                        return
                if not listed and start == 0:  # emptied or truncated while the run went on
                    raise DataError(f"no image is listed in {self._name} any more; check "
                                    "the data and start again")
                start = 0
        except BaseException as exc:  # handed to the caller, which raises it
            self._put(exc)

    def get(self) -> tuple[int, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ImageBuffer:
    """Decoded, standardized images of this rank's share of ``source`` for patch sampling
    (module docstring).

    Attributes:
        images: (n, 3, size, size) on ``device``, n = min(capacity, the share's size).
        streaming: whether the share is larger than ``capacity`` (then :meth:`refresh` works).
    """

    def __init__(self, source: ImageSource, *, size: int, capacity: int, refresh: int = 1,
                 world: World = SINGLE, device: torch.device = torch.device("cpu"),
                 reporter: Reporter = NULL_REPORTER) -> None:
        self.source, self.size, self.refresh_count = source, size, refresh
        self.world, self.device, self.reporter = world, device, reporter
        self.share = len(range(world.rank, source.count, world.size))
        self.streaming = self.share > capacity
        self.n = min(capacity, self.share)
        self.images = torch.empty(0, 3, size, size, device=device)
        self.positions: list[int] = []
        self.next = 0
        self._reader: _Reader | None = None
        self._all_loaded = False
        self._fresh = False  # holds the first images of the share, not refreshed since
        self._skipped_before = 0
        self._skipped_shown: list[str] = []

    def _iter_share(self, start: int) -> Iterator[tuple[int, Sample]]:
        """(position in this rank's share, sample) from ``start`` to the end of the stream."""
        rank, size = self.world.rank, self.world.size
        for i, sample in enumerate(self.source.open()):
            pos, mine = divmod(i, size)
            if pos >= self.share:  # images added since the count: not in this run
                return
            if mine == rank and pos >= start:
                yield pos, sample

    def start(self, state: torch.Tensor | None = None) -> None:
        """Fill the buffer from the start of the share, or as ``state`` (:meth:`state`) left it;
        a state saved by another number of processes is ignored (the share was another).
        Without streaming every image is decoded once, on the first call."""
        if not self.streaming:
            if not self._all_loaded:
                samples = [sample for _, sample in self._iter_share(0)]
                if len(samples) < self.n:
                    raise DataError(f"{self.n - len(samples)} of {self.source.name} went "
                                    "missing since they were counted; start again")
                self.images = load_images(samples, self.size, reporter=self.reporter).to(
                    self.device)
                self.positions = list(range(self.n))
                self._all_loaded = True
            return
        if state is not None and int(state[-1]) != self.world.size:
            state = None
        if state is None and self._fresh:
            return
        self.close()
        self._skipped_before, self._skipped_shown = 0, []
        self.images = torch.empty(0)  # freed before the new buffer is filled
        images = torch.empty(self.n, 3, self.size, self.size)
        if state is None:
            reader = self._open_reader(0)
            task = self.reporter.task("teacher: filling the image buffer", self.n)
            positions = []
            for k in range(self.n):
                pos, images[k] = reader.get()
                positions.append(pos)
                task.advance(1)
            task.done()
        else:
            positions, nxt = [int(v) for v in state[:-2]], int(state[-2])
            if len(positions) != self.n:
                raise DataError(f"the checkpoint's image buffer holds {len(positions)} images, "
                                f"not {self.n} ({self.source.name} changed?); start again "
                                "without resuming")
            slots: dict[int, list[int]] = {}
            for slot, pos in enumerate(positions):
                slots.setdefault(pos, []).append(slot)
            for pos, sample in self._iter_share(min(positions)):
                if pos in slots:
                    tensor = _decode(sample, self.size)
                    for slot in slots.pop(pos):
                        images[slot] = tensor
                    if not slots:
                        break
            if slots:
                raise DataError(f"the images of the checkpoint's buffer are no longer in "
                                f"{self.source.name}; start again without resuming")
            reader = self._open_reader(nxt)
        self.images = images.to(self.device)
        self.positions = positions
        self.next = (positions[-1] + 1) if state is None else nxt
        self._fresh = state is None

    def _open_reader(self, start: int) -> _Reader:
        self._reader = _Reader(self._iter_share, self.share, self.size, start,
                               ahead=max(4, 2 * self.refresh_count), name=self.source.name)
        return self._reader

    def refresh(self, generator: torch.Generator) -> None:
        """Replace ``refresh`` images, in slots drawn from ``generator`` (streams only)."""
        if not self.streaming:
            return
        assert self._reader is not None, "start() first"
        for _ in range(self.refresh_count):
            pos, tensor = self._reader.get()
            slot = int(torch.randint(self.n, (1,), generator=generator))
            self.images[slot] = tensor.to(self.device)
            self.positions[slot] = pos
            self.next = pos + 1
            self._fresh = False

    def state(self) -> torch.Tensor:
        """The stream position in every slot, the position read next and the number of
        processes (int64)."""
        return torch.tensor([*self.positions, self.next, self.world.size], dtype=torch.int64)

    def skipped(self) -> dict[str, Any]:
        """Unreadable images met since :meth:`start`: how many times (an image met again on
        a later round, or read ahead and not yet used, counts too) and the first errors."""
        count, shown = self._skipped_before, list(self._skipped_shown)
        if self._reader is not None:
            count += self._reader.n_skipped
            shown += self._reader.skipped
        return {"count": count, "first": shown[:SKIPPED_SHOWN]}

    def close(self) -> None:
        """Stop the reader thread (the images stay)."""
        if self._reader is not None:
            self._reader.close()
            self._skipped_before += self._reader.n_skipped
            self._skipped_shown += self._reader.skipped
            self._reader = None

    def __enter__(self) -> ImageBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""``stad score``: records (and maps) of image files, streamed, sharded and resumable."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from stad.api import Model, Result
from stad.config import ScoreSettings, Settings
from stad.console import NULL_REPORTER, Reporter, json_line, printable
from stad.errors import UsageError
from stad.fsutil import DISK_FULL, check_output_dir, check_output_file, output_lock, same_file
from stad.scorefiles import expand_inputs, in_shard, kept_records, map_names, write_maps
from stad.scoring import ImageError, iter_results


def score(settings: Settings, *, model_path: Path, inputs: Sequence[Path],
          maps_dir: Path | None = None, threshold: float | None = None,
          on_error: str = "fail", shard: tuple[int, int] | None = None,
          output: Path | None = None, skip_existing: bool = False,
          reporter: Reporter = NULL_REPORTER, resumed: dict[str, bool] | None = None
          ) -> Iterator[dict[str, Any]]:
    """``stad score``: yield one record per input image, in order, as it is scored.

    Records are dicts (see :meth:`stad.api.Result.to_dict`) plus ``map`` when maps are
    written; with ``on_error="skip"`` an unreadable image yields ``{"path", "error"}`` instead
    of stopping the run. With ``shard`` (K, N) only the inputs of shard K are scored
    (:func:`in_shard`). With ``output`` every record is also appended to that JSON Lines file
    before it is yielded (locked against a second writer); ``skip_existing`` keeps the file and
    skips the inputs it already has a record for, else the file starts empty. ``resumed``, a
    dict, receives those skipped inputs' paths with their recorded verdicts (``anomalous``),
    so that a resumed run can still gate on them. ``output`` may not be one of the inputs.
    """
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    if skip_existing and output is None:
        raise UsageError("--skip-existing needs --output FILE: the records to resume from")
    if maps_dir is not None:
        check_output_dir(maps_dir, create=False)  # made by the first map written
    if output is None:
        yield from _score(settings, model_path, inputs, maps_dir, threshold, on_error, shard,
                          None, False, reporter, resumed)
        return
    check_output_file(output, inputs={"--model": model_path}, in_place=True)
    if skip_existing and output.exists() and not output.is_file():
        raise UsageError(f"--skip-existing reads the records in --output {output}, which is not "
                         "a regular file (a device or FIFO); give a file")
    if output.exists() and not os.access(output, os.W_OK):  # written in place, not replaced
        raise UsageError(f"--output {output} cannot be written (no permission); choose "
                         "another file")
    with output_lock(output):
        yield from _score(settings, model_path, inputs, maps_dir, threshold, on_error,
                          shard, output, skip_existing, reporter, resumed)


def _score(settings: Settings, model_path: Path, inputs: Sequence[Path],
           maps_dir: Path | None, threshold: float | None, on_error: str,
           shard: tuple[int, int] | None, output: Path | None, skip_existing: bool,
           reporter: Reporter, resumed: dict[str, bool] | None) -> Iterator[dict[str, Any]]:
    model = Model.load(model_path, device=settings.device, score=settings.score)
    calibration, rule = model.score_rule()
    pixel = calibration.get("pixel_threshold")
    if threshold is None:
        threshold = calibration["threshold"]
    paths = expand_inputs(inputs, leave_out=maps_dir)
    if output is not None:  # opened for writing below: it would be emptied
        for p in paths:
            if same_file(p, output):
                raise UsageError(f"--output {output} is one of the images to score; writing "
                                 "there would lose it: give another file")
    names = map_names(paths) if maps_dir is not None else {}  # before sharding: alike in all
    if shard is not None:
        paths = [p for p in paths if in_shard(p, shard)]
    if output is not None and skip_existing:
        paths, kept, n_records = kept_records(paths, output, (threshold, pixel))
        if n_records and not kept:
            reporter.note(f"--skip-existing: none of the {n_records} records in "
                          f"{printable(output)} names an input of this run; records go by the "
                          "path as given, so name the inputs as the run that wrote them did")
        if resumed is not None:
            resumed.update(kept)
    task = reporter.task("scoring", len(paths))
    # Opened only now: a run that fails to start leaves an earlier output as it was.
    with open(output, "a" if skip_existing else "w", encoding="utf-8") if output is not None \
            else contextlib.nullcontext() as log:
        yield from _records(model, paths, rule, (threshold, pixel), on_error,
                            (maps_dir, names), log, task)
    task.done()


def _records(model: Model, paths: Sequence[Path], rule: ScoreSettings,
             thresholds: tuple[float, float | None], on_error: str,
             maps: tuple[Path | None, dict[Path, str]], log: TextIO | None, task: Any
             ) -> Iterator[dict[str, Any]]:
    threshold, pixel = thresholds
    maps_dir, names = maps
    # Batches of the score settings' batch_size images; the next batch is read while one runs.
    for out in iter_results(model.networks, paths, device=model.device):
        if isinstance(out, ImageError):
            if on_error != "skip":
                raise out.error
            record = {"path": str(out.path), "error": str(out.error)}
        else:
            result = Result.of(out, rule, threshold, pixel)
            record = result.to_dict()
            if maps_dir is not None and out.path is not None:
                record["map"] = write_maps(maps_dir, names[out.path], result.map, out.image,
                                           threshold, pixel, result.mask)
        if log is not None:
            _append(log, record)
        task.advance(1)
        yield record


def _append(log: TextIO, record: dict[str, Any]) -> None:
    """One record onto ``--output``, flushed; a full disk is a usage error (exit 2) saying how to
    go on: the lines written so far are whole records, and a cut-off last line is dropped by
    ``--skip-existing`` (:func:`~stad.scorefiles.recorded`)."""
    try:
        log.write(json_line(record) + "\n")
        log.flush()
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        with contextlib.suppress(OSError):  # closing would flush the buffered rest: fail again
            log.close()
        raise UsageError(f"cannot write --output {log.name}: {exc.strerror}; the records written "
                         "so far are kept: free space on its disk, then run the same command "
                         "with --skip-existing to score the rest") from None

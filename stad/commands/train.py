"""``pretrain-teacher``, ``inspect-teacher`` and ``fit-students``: checkpointed training runs
(:mod:`stad.training.checkpoint`) around :mod:`stad.training.teacher` and
:mod:`stad.training.students`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stad.artifacts import Artifact, check_artifact_output, file_sha256, record, save_artifact
from stad.commands.common import data_info, resume_command, save_model
from stad.config import Settings
from stad.console import NULL_REPORTER, Reporter
from stad.datasets.selection import relative_names, select_data
from stad.devices import resolve_device
from stad.distributed import joined
from stad.errors import ArtifactError, DataError, UsageError
from stad.fsutil import output_lock
from stad.images import preprocessing as image_preprocessing
from stad.model import BUILTIN_TEACHER, RANDOM_TEACHER, resolve_teachers, teacher_tensors
from stad.training.checkpoint import (
    images_identity,
    open_checkpoint,
    stop_on_signals,
    tensors_sha256,
)
from stad.training.imagebuffer import ImageSource
from stad.training.students import fit_students as train_students
from stad.training.students import split_train_val


def _init_identity(settings: Settings) -> str | None:
    # The bytes of the teacher a run starts from (teacher.init), not its path: a resume from
    # an overwritten file would mix two starts; pretrain_teachers reports a missing file.
    from stad.model import teacher_path

    init = settings.teacher.init
    path = teacher_path(init) if init else None
    return file_sha256(path) if path is not None and path.is_file() else None


def _backbone_identity(settings: Settings) -> str | None:
    # The backbone's bytes decide the distillation targets; pretrain_teachers reports a
    # missing or unreadable file itself.
    from stad.distillation import BACKBONES, backbone_path
    from stad.errors import UsageError
    from stad.training.teacher import resolve_target

    path = settings.teacher.backbone_weights
    target = resolve_target(settings.teacher)
    if path is None and target in BACKBONES:
        try:
            path = backbone_path(target)[0]
        except UsageError:
            return None
    if (path is None or settings.teacher.lambda_kd <= 0 or not Path(path).is_file()
            or target not in ("resnet18", *BACKBONES)):
        return None
    return file_sha256(Path(path))


def pretrain_teacher(settings: Settings, *, out: Path, resume: bool = False,
                     reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad pretrain-teacher``: train teachers on the training images of any adapter.

    The run is checkpointed beside ``out`` (:mod:`stad.training.checkpoint`); SIGINT/SIGTERM
    save and raise :class:`~stad.errors.Interrupted`; ``resume`` continues a checkpoint made
    with the same settings and data. The checkpoint is deleted once ``out`` is written.
    """
    from stad.training.teacher import pretrain_teachers

    check_artifact_output(out)
    selection = select_data(settings)
    # One pass that holds nothing, so that a collection of millions is never listed at once.
    listing = selection.scan("train")
    if not listing.count:
        raise DataError(f"no training images in {selection.describe()}")
    if listing.count <= settings.teacher.buffer_images:
        samples = selection.samples("train")
        images = images_identity(relative_names(samples, selection.root),
                                 [s.image for s in samples])
        source = ImageSource.of(samples)
    else:  # too many to read twice: identified by names, sizes and times, not bytes; listed
        # again on demand, and streamed where a process's share exceeds the buffer
        images = {"count": listing.count, "listing_sha256": listing.sha256}
        source = ImageSource(open=lambda: selection.iter_samples("train"), count=listing.count,
                             name=selection.describe())
    preprocessing = image_preprocessing(settings.teacher.image_size)
    # Under torchrun, one of N processes; only rank 0 locks and writes (as in `fit`).
    with joined(resolve_device(settings.device)) as (world, device), \
            output_lock(out) if world.main else contextlib.nullcontext():
        identity = {"images": images, "backbone": _backbone_identity(settings),
                    "init": _init_identity(settings)}
        checkpoint = open_checkpoint(
            out, command="pretrain-teacher", settings=settings, identity=identity,
            preprocessing=preprocessing, resume=resume,
            resume_command=resume_command("pretrain-teacher"), reporter=reporter)
        checkpoint.writer = world.main
        with stop_on_signals(checkpoint.stop):
            teachers, info = pretrain_teachers(settings, source, reporter=reporter,
                                               device=device, checkpoint=checkpoint,
                                               world=world)
            # which images: their count and a hash (of names and bytes, or of the listing for
            # a large collection), so that teachers of two photo sets can be told apart
            info["data"] = {**info.get("data", {}), **data_info(selection),
                            "images": {"count": listing.count,
                                       **{k: v for k, v in images.items() if k != "names"}}}
            artifact = Artifact(
                kind="teacher", tensors=teacher_tensors(teachers),
                config=settings.model_dump(mode="json"), preprocessing=preprocessing,
                seed=settings.seed, info=info)
            if world.main:
                save_artifact(out, artifact)
        checkpoint.remove()
    return {"artifact": str(out), "kind": "teacher", "patch_sizes": sorted(teachers),
            "resumed": checkpoint.resumed is not None, **info}


# ---- inspect-teacher --------------------------------------------------------------------------

INSPECT_MAX_IMAGES = 64  # diagnostics read at most this many training images, evenly spaced


def inspect_teacher(settings: Settings, *, teacher: str | Path,
                    patch_sizes: Sequence[int] | None = None, n_patches: int = 256,
                    reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad inspect-teacher``: collapse diagnostics (:mod:`stad.diagnostics`) per scale.

    ``teacher`` is a teacher or model artifact (its teachers), or ``random`` (the randomly
    initialized teachers ``fit-students --teacher random`` would use with this seed). The images
    are the training images of the selected data, resized to ``teacher.image_size``; without
    ``--dataset``/``--category`` those the artifact was trained on, else the synthetic
    ``grain`` set. Warnings name each scale that looks collapsed.
    """
    from stad.training.imagebuffer import load_images
    from stad.training.teacher import diagnose

    if n_patches < 2:
        raise UsageError(f"--patches must be at least 2, got {n_patches}")
    if str(teacher) == RANDOM_TEACHER and not patch_sizes:
        patch_sizes = settings.teacher.patch_sizes
    nets, source, info = resolve_teachers(teacher, patch_sizes, settings.seed)
    source.pop("info", None)
    # Data defaults to what the artifact was trained (or fitted) on; the built-in teacher's
    # training photos are not installed, so it is looked at on the synthetic set.
    data = record(info, "data", source["source"]) if source["source"] != BUILTIN_TEACHER \
        else {}
    given = settings.model_fields_set
    if "dataset" not in given and settings.category is None:
        settings = settings.model_copy(update={
            "dataset": data.get("dataset", "synthetic"), "root": data.get("root"),
            "category": data.get("category", "grain")})
    selection = select_data(settings)
    # Evenly spaced images picked as the listing streams by (a collection may hold millions).
    count = selection.scan("train").count
    if not count:
        raise DataError(f"no training images in {selection.describe()}")
    step = max(1.0, count / INSPECT_MAX_IMAGES)
    wanted = {int(k * step) for k in range(min(count, INSPECT_MAX_IMAGES))}
    samples = [s for i, s in enumerate(selection.iter_samples("train")) if i in wanted]
    size = settings.teacher.image_size
    too_big = [p for p in nets if p > size]
    if too_big:
        raise UsageError(f"teacher.image_size {size} is smaller than patch size {too_big[0]}; "
                         "raise it (STAD_TEACHER__IMAGE_SIZE) or choose --patch-sizes")
    images = load_images(samples, size, reporter=reporter)
    scales = {f"p{p}": diagnose(net, images, settings, n_patches)
              for p, net in sorted(nets.items())}
    return {"teacher": source, "data": {**data_info(selection), "n_images": len(samples),
                                        "image_size": size},
            "diagnostics": scales, "collapsed": sorted(k for k, v in scales.items()
                                                       if v["warnings"])}


def fit_students(settings: Settings, *, teacher: str | Path | None, out: Path, resume: bool = False,
        reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad fit-students``: fit students on a category and write the model artifact.

    Checkpointed and resumable like :func:`pretrain_teacher`; the checkpoint also records the
    teacher's weights, and resuming with other ones is refused.
    """
    check_artifact_output(out)
    selection = select_data(settings)
    cfg = settings.students
    train = selection.samples("train")
    if not train:  # said first: the hold-back's advice would lead nowhere
        raise DataError(f"no training images in {selection.describe()}; check --root and "
                        "--category (`stad datasets show` counts each split)")
    fit_samples, held, source = split_train_val(
        train, selection.samples("val"), fraction=cfg.val_fraction, seed=settings.seed)
    try:
        teachers, teacher_info, _ = resolve_teachers(teacher, cfg.teacher_patch_sizes,
                                                     settings.seed)
    except ArtifactError as exc:  # name the option given, as --model's errors do
        if teacher in (None, BUILTIN_TEACHER):
            raise
        raise ArtifactError(f"{exc} (given as --teacher, teacher=)") from None
    start = time.perf_counter()
    # Under torchrun, one of N processes (stad.distributed); only rank 0 writes (and so locks)
    # the output and the checkpoint.
    with joined(resolve_device(settings.device)) as (world, device), \
            output_lock(out) if world.main else contextlib.nullcontext():
        identity = {"images": images_identity(relative_names(fit_samples, selection.root),
                                              [s.image for s in fit_samples]),
                    "teacher": tensors_sha256(teacher_tensors(teachers))}
        checkpoint = open_checkpoint(
            out, command="fit-students", settings=settings, identity=identity,
            preprocessing=image_preprocessing(cfg.image_size),
            resume=resume, resume_command=resume_command("fit-students"), reporter=reporter)
        checkpoint.writer = world.main
        with stop_on_signals(checkpoint.stop):
            result = train_students(settings, fit_samples, teachers, reporter=reporter,
                                  device=device, checkpoint=checkpoint, world=world)
            info = {
                "data": {**data_info(selection), "n_fit": len(fit_samples),
                         "validation": {"source": source,
                                        "images": relative_names(held, selection.root)}},
                "teacher": teacher_info,
                "students": result.info,
                # with --resume, the interrupted runs' time too (as each scale's seconds)
                "seconds": round(checkpoint.seconds(since=start), 1),
            }
            if world.main:
                save_model(out, result.model, settings, info)
        checkpoint.remove()
    return {"artifact": str(out), "kind": "model", "patch_sizes": result.model.patch_sizes,
            "scales": result.model.scale_names,
            "n_fit": len(fit_samples), "n_validation": len(held),
            "final_loss": {k: v["loss_per_epoch"][-1] for k, v in result.info["scales"].items()},
            "resumed": checkpoint.resumed is not None, "processes": world.size,
            "seconds": info["seconds"]}

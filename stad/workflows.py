"""One library function per command: select data, run the step, write the artifact.

The CLI (:mod:`stad.cli`) only parses options and prints what these return, so every command
can also be run from Python and tested without a shell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from stad.artifacts import Artifact, load_artifact, save_artifact
from stad.checkpoint import images_identity, open_checkpoint, stop_on_signals, tensors_sha256
from stad.config import ScoreSettings, Settings
from stad.console import NULL_REPORTER, Reporter, json_line
from stad.data import DataSelection, relative_name, select_data
from stad.datasets.base import Sample
from stad.distributed import joined
from stad.errors import ArtifactError, DataError, UsageError
from stad.fsutil import check_output_dir, check_output_file, output_lock
from stad.imagebuffer import ImageSource
from stad.images import DEFAULT_MEAN, DEFAULT_STD
from stad.model import Model, load_teachers, model_from_tensors, model_tensors, teacher_tensors
from stad.networks import PATCH_SIZES, PatchNetwork, build_network
from stad.scoring import (
    calibrate_model,
    configure,
    f1_threshold,
    fpr_threshold,
    image_score,
    iter_maps,
    resolve_device,
)
from stad.students import fit_students, split_train_val

RANDOM_TEACHER = "random"
BUILTIN_TEACHER = "builtin"


def builtin_teacher_path() -> Path:
    """The teacher artifact shipped inside the package (how it was made: docs/quality.md,
    "The shipped teacher")."""
    return Path(__file__).resolve().parent / "assets" / "teacher.safetensors"


def resolve_teachers(teacher: str | Path | None, patch_sizes: Sequence[int] | None, seed: int
                     ) -> tuple[dict[int, PatchNetwork], dict[str, Any], dict[str, Any]]:
    """The teachers a command works with: ``teacher`` is a teacher or model artifact,
    ``random`` (randomly initialized, seeded by ``seed``) or ``builtin`` / None (the shipped
    teacher). ``patch_sizes`` None: every scale the artifact has (random: all three).

    Returns:
        the frozen teachers by patch size, their source (for the artifact's info), and the
        artifact's own info (empty for random teachers).
    """
    name = BUILTIN_TEACHER if teacher is None else str(teacher)
    if name == RANDOM_TEACHER:
        sizes = list(patch_sizes or PATCH_SIZES)
        nets = {p: build_network(p, generator=torch.Generator().manual_seed(seed + p))
                .eval().requires_grad_(False) for p in sizes}
        return nets, {"source": RANDOM_TEACHER, "seed": seed}, {}
    path = builtin_teacher_path() if name == BUILTIN_TEACHER else Path(name)
    if name == BUILTIN_TEACHER and not path.is_file():
        raise ArtifactError(f"the built-in teacher {path} is missing from this installation: "
                            "reinstall stad, or pass --teacher FILE (from `stad "
                            f"pretrain-teacher`) or --teacher {RANDOM_TEACHER}")
    artifact = load_artifact(path, kind=("teacher", "model"))
    nets = load_teachers(artifact.tensors, patch_sizes=patch_sizes)
    # A model records its teacher's pretraining info under teacher.info.
    info = (artifact.info.get("teacher", {}).get("info", {}) if artifact.kind == "model"
            else artifact.info)
    source = {"source": BUILTIN_TEACHER if name == BUILTIN_TEACHER else str(path),
              "kind": artifact.kind, "target": info.get("target"),
              "stad_version": artifact.stad_version, "info": info}
    return nets, source, info


def _relative(samples: Sequence[Sample], root: Path) -> list[str]:
    return [relative_name(s.image, root) for s in samples]


def _data_info(selection: DataSelection) -> dict[str, Any]:
    return {"dataset": selection.adapter.name, "root": str(selection.root),
            "category": selection.category}


# ---- pretrain-teacher ---------------------------------------------------------------------


def _resume_command(command: str) -> str:
    """How to continue an interrupted run: this command line plus ``--resume`` when it was
    run as ``stad COMMAND ...`` (or ``python -m stad``), else in words."""
    argv = sys.argv[1:]
    if command in argv and Path(sys.argv[0]).name in ("stad", "__main__.py"):
        line = shlex.join(["stad", *(a for a in argv if a != "--resume"), "--resume"])
        if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
            return f"start it under torchrun again (any number of processes) as {line}"
        return line
    return f"run the same `stad {command}` command again with --resume"


def _backbone_identity(settings: Settings) -> str | None:
    # The backbone's bytes decide the distillation targets; pretrain_teachers reports a
    # missing or unreadable file itself.
    from stad.distillation import BACKBONES, backbone_path
    from stad.errors import UsageError
    from stad.teacher import resolve_target

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
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pretrain_teacher(settings: Settings, *, out: Path, resume: bool = False,
                     reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad pretrain-teacher``: train teachers on the training images of any adapter.

    The run is checkpointed beside ``out`` (:mod:`stad.checkpoint`); SIGINT/SIGTERM save and
    raise :class:`~stad.errors.Interrupted`; ``resume`` continues a checkpoint made with the
    same settings and data. The checkpoint is deleted once ``out`` is written.
    """
    from stad.teacher import pretrain_teachers

    check_output_file(out)
    selection = select_data(settings)
    # One pass that holds nothing, so that a collection of millions is never listed at once.
    listing = selection.scan("train")
    if not listing.count:
        raise DataError(f"no training images in {selection.describe()}")
    if listing.count <= settings.teacher.buffer_images:
        samples = selection.samples("train")
        images = images_identity(_relative(samples, selection.root), [s.image for s in samples])
        source = ImageSource.of(samples)
    else:  # too many to read twice: identified by names, sizes and times, not bytes; listed
        # again on demand, and streamed where a process's share exceeds the buffer
        images = {"count": listing.count, "listing_sha256": listing.sha256}
        source = ImageSource(open=lambda: selection.iter_samples("train"), count=listing.count,
                             name=selection.describe())
    preprocessing = {"image_size": settings.teacher.image_size, "mean": list(DEFAULT_MEAN),
                     "std": list(DEFAULT_STD)}
    # Under torchrun, one of N processes; only rank 0 locks and writes (as in `fit`).
    with joined(resolve_device(settings.device)) as (world, device), \
            output_lock(out) if world.main else contextlib.nullcontext():
        identity = {"images": images, "backbone": _backbone_identity(settings)}
        checkpoint = open_checkpoint(
            out, command="pretrain-teacher", settings=settings, identity=identity,
            preprocessing=preprocessing, resume=resume,
            resume_command=_resume_command("pretrain-teacher"), reporter=reporter)
        checkpoint.writer = world.main
        with stop_on_signals(checkpoint.stop):
            teachers, info = pretrain_teachers(settings, source, reporter=reporter,
                                               device=device, checkpoint=checkpoint,
                                               world=world)
            info["data"] = {**info.get("data", {}), **_data_info(selection)}
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
    from stad.console import warn
    from stad.diagnostics import collapse_warnings, teacher_diagnostics
    from stad.imagebuffer import load_images

    if n_patches < 2:
        raise UsageError(f"--patches must be at least 2, got {n_patches}")
    if str(teacher) == RANDOM_TEACHER and not patch_sizes:
        patch_sizes = settings.teacher.patch_sizes
    nets, source, info = resolve_teachers(teacher, patch_sizes, settings.seed)
    source.pop("info", None)
    # Data defaults to what the artifact was trained (or fitted) on; the built-in teacher's
    # training photos are not installed, so it is looked at on the synthetic set.
    data = info.get("data", {}) if source["source"] != BUILTIN_TEACHER else {}
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
    cfg = settings.teacher
    scales: dict[str, Any] = {}
    for p, net in sorted(nets.items()):
        shift = max(0, min(cfg.positive_shift, (size - p) // 2))
        diag = teacher_diagnostics(net, images, n_patches=n_patches, shift=shift,
                                   noise=cfg.positive_noise, seed=settings.seed)
        diag["warnings"] = collapse_warnings(diag)
        for line in diag["warnings"]:
            warn(line)
        scales[f"p{p}"] = diag
    return {"teacher": source, "data": {**_data_info(selection), "n_images": len(samples),
                                        "image_size": size},
            "diagnostics": scales, "collapsed": sorted(k for k, v in scales.items()
                                                       if v["warnings"])}


# ---- fit-students ----------------------------------------------------------------------------


def fit(settings: Settings, *, teacher: str | Path | None, out: Path, resume: bool = False,
        reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad fit-students``: fit students on a category and write the model artifact.

    Checkpointed and resumable like :func:`pretrain_teacher`; the checkpoint also records the
    teacher's weights, and resuming with other ones is refused.
    """
    check_output_file(out)
    selection = select_data(settings)
    cfg = settings.students
    fit_samples, held, source = split_train_val(
        selection.samples("train"), selection.samples("val"), fraction=cfg.val_fraction,
        seed=settings.seed)
    teachers, teacher_info, _ = resolve_teachers(teacher, cfg.patch_sizes, settings.seed)
    start = time.perf_counter()
    # Under torchrun, one of N processes (stad.distributed); only rank 0 writes (and so locks)
    # the output and the checkpoint.
    with joined(resolve_device(settings.device)) as (world, device), \
            output_lock(out) if world.main else contextlib.nullcontext():
        identity = {"images": images_identity(_relative(fit_samples, selection.root),
                                              [s.image for s in fit_samples]),
                    "teacher": tensors_sha256(teacher_tensors(teachers))}
        checkpoint = open_checkpoint(
            out, command="fit-students", settings=settings, identity=identity,
            preprocessing={"image_size": cfg.image_size, "mean": list(DEFAULT_MEAN),
                           "std": list(DEFAULT_STD)},
            resume=resume, resume_command=_resume_command("fit-students"), reporter=reporter)
        checkpoint.writer = world.main
        with stop_on_signals(checkpoint.stop):
            result = fit_students(settings, fit_samples, teachers, reporter=reporter,
                                  device=device, checkpoint=checkpoint, world=world)
            info = {
                "data": {**_data_info(selection), "n_fit": len(fit_samples),
                         "validation": {"source": source,
                                        "images": _relative(held, selection.root)}},
                "teacher": teacher_info,
                "students": result.info,
                "seconds": round(time.perf_counter() - start, 1),
            }
            if world.main:
                _save_model(out, result.model, settings, info)
        checkpoint.remove()
    return {"artifact": str(out), "kind": "model", "patch_sizes": result.model.patch_sizes,
            "n_fit": len(fit_samples), "n_validation": len(held),
            "final_loss": {k: v["loss_per_epoch"][-1] for k, v in result.info["scales"].items()},
            "resumed": checkpoint.resumed is not None, "processes": world.size,
            "seconds": info["seconds"]}


def _save_model(path: Path, model: Model, settings: Settings, info: dict[str, Any]) -> None:
    save_artifact(path, Artifact(kind="model", tensors=model_tensors(model),
                                 config=settings.model_dump(mode="json"),
                                 preprocessing=model.preprocessing, seed=settings.seed,
                                 info=info))


def _with_model_data(settings: Settings, artifact: Artifact) -> Settings:
    """Dataset, root and category default to those the model was fitted on."""
    data = artifact.info.get("data", {})
    given = settings.model_fields_set
    return settings.model_copy(update={
        "dataset": settings.dataset if "dataset" in given else data.get("dataset", "mvtec"),
        "root": settings.root if settings.root is not None else data.get("root"),
        "category": settings.category if settings.category is not None else data.get("category"),
    })


def load_model(path: Path, device: torch.device, *, calibration: bool = True
               ) -> tuple[Model, Artifact]:
    """A model artifact in memory; ``calibration=False`` skips its calibration statistics."""
    artifact = load_artifact(path, kind="model")
    model = model_from_tensors(artifact.tensors, artifact.preprocessing,
                               calibration=calibration)
    return model.to(device).eval(), artifact


# ---- calibrate -------------------------------------------------------------------------------


def validation_samples(selection: DataSelection, info: dict[str, Any]) -> list[Sample]:
    """The anomaly-free images fit-students kept for calibration (recorded in the model)."""
    val = info.get("data", {}).get("validation", {})
    if val.get("source") == "adapter val split":
        return selection.samples("val")
    wanted = list(val.get("images", []))
    if not wanted:
        raise DataError("the model holds no record of validation images (students.val_fraction "
                        "was 0); refit with a held-back share or give the dataset a val split")
    by_name = dict(zip(_relative(selection.samples("train"), selection.root),
                       selection.samples("train"), strict=True))
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise DataError(f"validation images recorded in the model are missing from "
                        f"{selection.describe()}: {', '.join(missing[:5])}")
    return [by_name[w] for w in wanted]


def calibrate(settings: Settings, *, model_path: Path, out: Path | None = None,
              reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad calibrate``: standardization statistics and an image threshold, stored in the model.

    The data selection defaults to what the model was fitted on.
    """
    cfg = settings.calibrate
    if cfg.threshold is not None and cfg.threshold_method != "manual":
        raise UsageError(f"--threshold applies only to --method manual, not to "
                         f"--method {cfg.threshold_method}; give one or the other")
    if cfg.threshold_method == "manual" and cfg.threshold is None:
        raise UsageError("threshold method 'manual' needs --threshold T")
    if out is not None:
        check_output_file(out)
    device = resolve_device(settings.device)
    model, artifact = load_model(model_path, device, calibration=False)  # replaced here
    configure(model, settings.score)
    settings = _with_model_data(settings, artifact)
    selection = select_data(settings)
    val = validation_samples(selection, artifact.info)
    paths = [s.image for s in val]
    stats, normal_scores = calibrate_model(model, paths, settings.score, device=device,
                                           normalize=cfg.normalize, reporter=reporter)
    if cfg.threshold_method == "manual":
        assert cfg.threshold is not None  # checked above
        threshold = cfg.threshold
    elif cfg.threshold_method == "fpr":
        threshold = fpr_threshold(normal_scores, cfg.target_fpr)
    else:
        test = selection.samples("test")
        scores = [image_score(m.maps["fused"], settings.score)
                  for m in iter_maps(model, [s.image for s in test], device=device,
                                     reporter=reporter, what="test scores")]
        threshold = f1_threshold(scores, [s.label == "anomalous" for s in test])
    calibration = {
        "method": cfg.threshold_method, "threshold": threshold,
        "target_fpr": cfg.target_fpr if cfg.threshold_method == "fpr" else None,
        "image_score": settings.score.image_score,
        "topk_fraction": settings.score.topk_fraction,
        "normalize": cfg.normalize,
        "n_images": len(val), "images_source": artifact.info["data"]["validation"]["source"],
        "statistics": {f"p{p}": dict(zip(("e_mean", "e_std", "v_mean", "v_std"),
                                         s.tolist(), strict=True)) for p, s in stats.items()},
        "normal_scores": {"min": min(normal_scores), "max": max(normal_scores)},
    }
    info = {**artifact.info, "calibration": calibration}
    target = out or model_path
    with output_lock(target):
        saved = Settings.model_validate({**artifact.config, "calibrate": cfg.model_dump(),
                                         "score": settings.score.model_dump()})
        _save_model(target, model, saved, info)
    return {"artifact": str(target), **calibration}


# ---- score -----------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly, plus the image files under named folders (recursively,
    sorted; files without an image suffix and hidden files in folders are skipped)."""
    from stad.images import is_image_file

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder {path} holds no image files "
                                f"(looked for .png, .jpg, .bmp, .tif, .webp)")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return out


def _map_name(path: Path) -> str:
    parts = [p for p in path.with_suffix("").parts if p not in ("/", "..", ".")]
    return "__".join(parts[-3:])


def write_maps(folder: Path, path: Path, amap: Any, image: Any, threshold: float | None
               ) -> str:
    """Heat map, overlay (PNG) and the raw float map (32-bit TIFF) of one image, atomically."""
    import io

    from PIL import Image

    from stad.fsutil import atomic_write_bytes
    from stad.visualize import display_range, heat, overlay

    lo, hi = display_range(threshold, amap)
    base = folder / _map_name(path)
    for suffix, array, mode in (
        ("_heat.png", heat(amap, lo, hi), "RGB"),
        ("_overlay.png", overlay(image, amap, lo, hi), "RGB"),
        ("_map.tiff", amap.astype("float32"), "F"),
    ):
        buf = io.BytesIO()
        Image.fromarray(array, mode=mode if mode == "F" else None).save(
            buf, format="TIFF" if mode == "F" else "PNG")
        atomic_write_bytes(Path(str(base) + suffix), buf.getvalue())
    return str(base) + "_map.tiff"


def _calibrated(model_path: Path, artifact: Artifact, settings: Settings
                ) -> tuple[dict[str, Any], Settings]:
    """The model's calibration, and the settings with the image-score rule it was made with
    (a threshold only means something for the rule it was set on)."""
    calibration = artifact.info.get("calibration")
    if calibration is None:
        raise UsageError(f"{model_path} is not calibrated: run `stad calibrate --model "
                         f"{model_path}` first")
    rule = ScoreSettings(image_score=calibration["image_score"],
                         topk_fraction=calibration["topk_fraction"])
    return calibration, settings.model_copy(update={"score": rule})


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 ≤ K < N (``stad score --shard``)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must be K/N with whole numbers, e.g. 0/4; got {text!r}"
                         ) from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def in_shard(path: Path, shard: tuple[int, int]) -> bool:
    """Whether ``path`` (as given) belongs to shard K of N: by a hash of the path, so that the
    N shards cover any set of inputs exactly once, whatever order each machine lists them in."""
    k, n = shard
    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n == k


def recorded_paths(output: Path) -> set[str]:
    """Paths already scored in a JSON Lines ``--output`` file (records without an error).

    A last line cut short by a crash is removed from the file, so appending goes on cleanly.
    """
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    done = set()
    for line in complete.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "path" in record and "error" not in record:
            done.add(str(record["path"]))
    return done


def score(settings: Settings, *, model_path: Path, inputs: Sequence[Path],
          maps_dir: Path | None = None, threshold: float | None = None,
          on_error: str = "fail", shard: tuple[int, int] | None = None,
          output: Path | None = None, skip_existing: bool = False,
          reporter: Reporter = NULL_REPORTER) -> Iterator[dict[str, Any]]:
    """``stad score``: yield one record per input image, in order, as it is scored.

    Records are dicts (see :func:`stad.scoring.verdict_record`) plus ``map`` when maps are
    written; with ``on_error="skip"`` an unreadable image yields ``{"path", "error"}`` instead
    of stopping the run. With ``shard`` (K, N) only the inputs of shard K are scored
    (:func:`in_shard`). With ``output`` every record is also appended to that JSON Lines file
    before it is yielded (locked against a second writer); ``skip_existing`` keeps the file and
    skips the inputs it already has a record for, else the file starts empty.
    """
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    if skip_existing and output is None:
        raise UsageError("--skip-existing needs --output FILE: the records to resume from")
    if maps_dir is not None:
        check_output_dir(maps_dir)
    if output is None:
        yield from _score(settings, model_path, inputs, maps_dir, threshold, on_error, shard,
                          None, False, reporter)
        return
    check_output_file(output)
    with output_lock(output):
        yield from _score(settings, model_path, inputs, maps_dir, threshold, on_error,
                          shard, output, skip_existing, reporter)


def _score(settings: Settings, model_path: Path, inputs: Sequence[Path],
           maps_dir: Path | None, threshold: float | None, on_error: str,
           shard: tuple[int, int] | None, output: Path | None, skip_existing: bool,
           reporter: Reporter) -> Iterator[dict[str, Any]]:
    device = resolve_device(settings.device)
    model, artifact = load_model(model_path, device)
    configure(model, settings.score)  # before _calibrated swaps in the calibrated score rule
    calibration, settings = _calibrated(model_path, artifact, settings)
    if threshold is None:
        threshold = calibration["threshold"]
    paths = expand_inputs(inputs)
    if shard is not None:
        paths = [p for p in paths if in_shard(p, shard)]
    if output is not None and skip_existing:
        done = recorded_paths(output)
        paths = [p for p in paths if str(p) not in done]
    task = reporter.task("scoring", len(paths))
    # Opened only now: a run that fails to start leaves an earlier output as it was.
    with open(output, "a" if skip_existing else "w", encoding="utf-8") if output is not None \
            else contextlib.nullcontext() as log:
        yield from _records(model, paths, device, settings, threshold, on_error, maps_dir,
                            log, task)
    task.done()


def _records(model: Model, paths: Sequence[Path], device: torch.device, settings: Settings,
             threshold: float | None, on_error: str, maps_dir: Path | None,
             log: TextIO | None, task: Any) -> Iterator[dict[str, Any]]:
    from stad.scoring import ImageError, iter_results, verdict_record

    # Batches of model.inference.batch_size images; the next batch is read while one runs.
    for maps in iter_results(model, paths, device=device):
        if isinstance(maps, ImageError):
            if on_error != "skip":
                raise maps.error
            record = {"path": str(maps.path), "error": str(maps.error)}
        else:
            record = verdict_record(maps, settings, threshold)
            if maps_dir is not None:
                record["map"] = write_maps(maps_dir, maps.path, maps.maps["fused"], maps.image,
                                           threshold)
        if log is not None:
            log.write(json_line(record) + "\n")
            log.flush()
        task.advance(1)
        yield record


# ---- evaluate --------------------------------------------------------------------------------


def evaluate(settings: Settings, *, model_path: Path, report: Path | None = None,
             reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad evaluate``: metrics on the adapter's labelled test split, optionally a report.

    The data selection defaults to what the model was fitted on.
    """
    from stad.evaluation import collect, compute_metrics, write_report

    if report is not None:
        check_output_dir(report)
    device = resolve_device(settings.device)
    model, artifact = load_model(model_path, device)
    configure(model, settings.score)  # before _calibrated swaps in the calibrated score rule
    calibration, settings = _calibrated(model_path, artifact, settings)
    settings = _with_model_data(settings, artifact)
    selection = select_data(settings)
    test = selection.samples("test")
    if not test:
        raise DataError(f"no test images in {selection.describe()}")
    items = collect(model, test, settings, device=device, reporter=reporter)
    try:
        result = compute_metrics(items, settings.evaluate.fpr_limit)
    except ValueError as exc:
        raise DataError(f"cannot evaluate {selection.describe()}: {exc}") from None
    result = {"model": str(model_path), **_data_info(selection), **result}
    if report is not None:
        result["report"] = write_report(report, result, items, threshold=calibration["threshold"],
                                        title=f"stad evaluation: {selection.describe()}")
    return result


# ---- demo ------------------------------------------------------------------------------------

# The demo's settings: the whole pipeline on one synthetic category in a few minutes on a
# 2-core CPU. Smaller than the paper's (documented in docs/usage.md, "stad demo").
DEMO_CATEGORY = "grain"
DEMO_SETTINGS: dict[str, Any] = {
    "dataset": "synthetic",
    "category": DEMO_CATEGORY,
    # target "none" (triplet + compactness): what the demo's figures in docs/usage.md were
    # measured with; the handcrafted target's quality is in docs/quality.md.
    "teacher": {"patch_sizes": [17, 33], "iterations": 50, "image_size": 64, "target": "none"},
    "students": {"preset": "fast", "patch_sizes": [17, 33], "image_size": 64, "epochs": 8,
                 "crop_size": None, "batch_size": 4, "lr": 1e-3, "precision": "auto"},
}


def demo(*, out: Path, seed: int = 0, device: str = "auto",
         reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
    """``stad demo``: generate the synthetic data, pretrain, fit, calibrate, evaluate, report."""
    from stad.config import resolve_settings
    from stad.datasets.synthetic import ensure_generated

    check_output_dir(out)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    data_root = out / "data"

    def step(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)

    ensure_generated(data_root, DEMO_CATEGORY, seed=seed)
    step("generate")
    settings = resolve_settings({**DEMO_SETTINGS, "root": data_root, "seed": seed,
                                 "device": device}, environ={})
    teacher_path, model_path = out / "teacher.safetensors", out / "model.safetensors"
    reporter.note("pretraining the teacher ...")
    pretrain_teacher(settings, out=teacher_path, reporter=reporter)
    step("pretrain-teacher")
    reporter.note("fitting the students ...")
    fit(settings, teacher=teacher_path, out=model_path, reporter=reporter)
    step("fit-students")
    calibration = calibrate(settings, model_path=model_path, reporter=reporter)
    step("calibrate")
    result = evaluate(settings, model_path=model_path, report=out / "report", reporter=reporter)
    step("evaluate")
    fused = result["maps"]["fused"]
    return {
        "category": DEMO_CATEGORY,
        "au_pro": fused.get("au_pro"),
        "image_auroc": fused.get("image_auroc"),
        "pixel_auroc": fused.get("pixel_auroc"),
        "per_scale": {k: {"au_pro": v.get("au_pro"), "image_auroc": v.get("image_auroc")}
                      for k, v in result["maps"].items() if k != "fused"},
        "threshold": calibration["threshold"],
        "seconds": timings,
        "total_seconds": round(time.perf_counter() - start, 1),
        "model": str(model_path),
        "report": str(out / "report" / "report.md"),
    }

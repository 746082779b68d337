"""The public Python API: load a model, score images, and run each step from Python.

Everything here is covered by :data:`stad.API_VERSION`'s promise (docs/api.md)::

    import stad
    model = stad.load_model("model.safetensors")
    result = model.score("part.png")        # or a PIL image, a NumPy array, or a list of them
    result.score, result.anomalous, result.threshold, result.map   # map: (H, W) at the input's size

The steps of the command line take keyword settings, nested as in the TOML file
(docs/usage.md, "Settings"), or a :class:`~stad.config.Settings`; from Python the environment
and ``$STAD_CONFIG`` are not read::

    stad.fit_students("model.safetensors", dataset="synthetic", category="grain", root="data",
                      students={"preset": "fast"})
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from PIL import Image

from stad.artifacts import Artifact, check_artifact_name, load_artifact
from stad.calibration import (
    calibrate_model,
    check_threshold_method,
    f1_threshold,
    fpr_threshold,
    stored_rule,
    stored_smooth_sigma,
    stored_tta,
    stored_variance_weight,
)
from stad.commands.common import save_model
from stad.config import (
    STUDENT_PRESETS,
    ScoreSettings,
    Settings,
    TtaName,
    merge,
    preset_scales_at,
    settings_from,
)
from stad.console import NULL_REPORTER, Reporter
from stad.devices import resolve_device
from stad.errors import ArtifactError, UsageError
from stad.fsutil import output_lock
from stad.model import Networks, model_from_tensors
from stad.regions import Region, find_regions
from stad.scoring import ImageMaps, configure, image_score, is_path, iter_maps

ImageInput = Any
"""What :meth:`Model.score` takes as one image: a file path (``str`` or ``os.PathLike``), a
PIL image, or a NumPy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of ``uint8``, ``uint16``,
``bool`` or floats in [0, 1] (:func:`stad.images.as_rgb`)."""


@dataclass(frozen=True, eq=False)  # compared by identity: its fields hold arrays
class Result:
    """The verdict on one image.

    Attributes:
        map: the fused anomaly map, (H, W) float32 at the input image's own size.
        score: the image score (the mean of the map's top pixels, the default, or its
            maximum, as the model was calibrated).
        threshold: the threshold used (the calibrated one unless another was given).
        anomalous: ``score > threshold``.
        scales: the image score of each scale's map (``{"p17": ..., "p33": ...}``).
        maps: each scale's map, (H, W) like ``map``.
        path: the file the image was read from; None for an image given in memory.
        pixel_threshold: the calibrated pixel threshold (None for a model calibrated before
            stad recorded one).
        regions: the defect regions, the 8-connected components of ``map > pixel_threshold``
            of at least ``min_region_area`` pixels, highest peak first
            (:class:`stad.regions.Region`).
    """

    map: np.ndarray
    score: float
    threshold: float
    anomalous: bool
    scales: dict[str, float] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    path: str | None = None
    pixel_threshold: float | None = None
    regions: list[Region] = field(default_factory=list)

    @classmethod
    def of(cls, maps: ImageMaps, rule: ScoreSettings, threshold: float,
           pixel_threshold: float | None = None) -> Result:
        """The result of one image's maps, scored by ``rule``, judged against ``threshold``,
        its regions above ``pixel_threshold`` (of ``rule.min_region_area`` pixels or more)."""
        fused = maps.maps["fused"]
        score = image_score(fused, rule)
        regions = ([] if pixel_threshold is None else
                   find_regions(fused, pixel_threshold, min_area=rule.min_region_area))
        return cls(map=fused, score=score, threshold=threshold,
                   anomalous=bool(score > threshold),
                   scales={k: image_score(v, rule) for k, v in maps.maps.items()
                           if k != "fused"},
                   maps={k: v for k, v in maps.maps.items() if k != "fused"},
                   path=None if maps.path is None else str(maps.path),
                   pixel_threshold=pixel_threshold, regions=regions)

    @property
    def mask(self) -> np.ndarray | None:
        """``map > pixel_threshold`` (bool, (H, W)); None without a pixel threshold."""
        return None if self.pixel_threshold is None else self.map > self.pixel_threshold

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of ``stad score --json``: path, score, threshold, anomalous,
        scales, pixel_threshold and regions (no maps)."""
        return {"path": self.path, "score": self.score, "threshold": self.threshold,
                "anomalous": self.anomalous, "scales": dict(self.scales),
                "pixel_threshold": self.pixel_threshold,
                "regions": [r.to_dict() for r in self.regions]}


def _onnx_options(path: Path, device: str | torch.device, score: ScoreSettings | None,
                  image_size: int) -> None:
    """An exported model runs in onnxruntime on the CPU, in float32, on whole images: a
    device, precision or tile size it cannot honour is refused rather than ignored (the tile
    size where one was set: the default's tiles are exact, so whole images give the same
    maps)."""
    if str(device) not in ("auto", "cpu"):
        raise UsageError(f"{path} is an exported ONNX model, scored on the CPU by onnxruntime: "
                         f"device {device} cannot be used; score the .safetensors model to "
                         "use a GPU")
    if score is not None and score.precision != "fp32":
        raise UsageError(f"{path} is an exported ONNX model, scored in float32: precision "
                         f"{score.precision} cannot be used; score the .safetensors model "
                         "for bf16")
    if score is not None and "tile_size" in score.model_fields_set \
            and score.tile_size is not None and score.tile_size < image_size:
        raise UsageError(f"{path} is an exported ONNX model, which scores whole "
                         f"{image_size}² images: tile size {score.tile_size} cannot be used; "
                         "score the .safetensors model to tile, or set the tile size to 0")


class Model:
    """A fitted model loaded from its artifact (:func:`load_model`): scores images, can be
    calibrated on anomaly-free images and saved.

    Attributes:
        networks: the teachers, students and statistics (:class:`stad.model.Networks`).
        path: the artifact it was loaded from (None if none).
        device: where the networks run.
        info: the artifact's provenance and results (``info["calibration"]`` once calibrated).
        config: the settings that made it, as stored in the artifact.
    """

    def __init__(self, networks: Networks, artifact: Artifact, *, path: Path | None,
                 device: torch.device, score: ScoreSettings) -> None:
        self.networks = configure(networks.to(device).eval(), score)
        self.path = path
        self.device = device
        self.info: dict[str, Any] = dict(artifact.info)
        self.config: dict[str, Any] = dict(artifact.config)
        self.seed = artifact.seed
        self._score = score

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto",
             score: ScoreSettings | None = None, calibration: bool = True) -> Model:
        """The model artifact at ``path``; ``score`` says how maps are computed (batch, tiles,
        precision) and, until calibrated, how an image score is taken. ``calibration=False``
        leaves out the stored calibration (which :meth:`calibrate` replaces)."""
        path = Path(path)
        if path.suffix.lower() == ".onnx":  # from `stad export`: scored with onnxruntime
            from stad.export import load_onnx

            if not calibration:
                raise UsageError(f"{path} is an exported ONNX model and cannot be calibrated: "
                                 "calibrate the .safetensors model and export again")
            # onnxruntime with as many threads as torch would use (OMP_NUM_THREADS,
            # torch.set_num_threads, else the cores), not its own default.
            onnx_networks, info = load_onnx(path, threads=torch.get_num_threads())
            _onnx_options(path, device, score, int(onnx_networks.preprocessing["image_size"]))
            return cls(onnx_networks, Artifact(  # type: ignore[arg-type]
                kind="model", tensors={}, config={}, preprocessing=onnx_networks.preprocessing,
                seed=0, info=info), path=path, device=torch.device("cpu"),
                score=score or ScoreSettings())
        try:
            missing = not path.exists() and not path.is_symlink()
        except OSError:  # a name too long, no permission: load_artifact says which
            missing = False
        if missing:
            raise ArtifactError(f"model {path} does not exist: give a model from `stad "
                                "fit-students` (on the command line, --model FILE)")
        artifact = load_artifact(path, kind="model")
        try:
            networks = model_from_tensors(artifact.tensors, artifact.preprocessing,
                                          calibration=calibration)
        except ArtifactError as exc:  # say which file
            raise ArtifactError(f"{path}: {exc}") from None
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            # tensors missing, misnamed or of the wrong shape: written by another program
            raise ArtifactError(f"{path} does not hold a well-formed model "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                                "produce it again (stad fit-students)") from None
        if not calibration:
            artifact.info.pop("calibration", None)
        elif artifact.info.get("calibration") is not None:
            stored_rule(artifact.info["calibration"], path)  # refused before any image
            networks.smooth_sigma = stored_smooth_sigma(artifact.info["calibration"], path)
            networks.variance_weight = stored_variance_weight(artifact.info["calibration"], path)
            networks.tta = stored_tta(artifact.info["calibration"], path)
        return cls(networks, artifact, path=path, device=resolve_device(device),
                   score=score or ScoreSettings())

    @property
    def patch_sizes(self) -> list[int]:
        """The distinct patch sizes of the model's scales."""
        return self.networks.patch_sizes

    @property
    def scales(self) -> list[str]:
        """The scales' names: ``p17`` at the model's image size, ``p17@128`` at 128² (the keys
        of :attr:`Result.scales` and of its maps)."""
        return list(self.networks.scale_names)

    @property
    def image_size(self) -> int:
        """The side of the square the images are resized to before the networks see them."""
        return int(self.networks.preprocessing["image_size"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        """What :meth:`calibrate` (or ``stad calibrate``) recorded, a copy; None if not
        calibrated."""
        return copy.deepcopy(self.info.get("calibration"))

    @property
    def threshold(self) -> float | None:
        """The calibrated image threshold (None if not calibrated)."""
        calibration = self.info.get("calibration")  # read, not copied
        return None if calibration is None else calibration["threshold"]

    def score_rule(self) -> tuple[dict[str, Any], ScoreSettings]:
        """The calibration, and the score settings with the image-score rule it was made with
        (a threshold only means something for the rule it was set on)."""
        name = self.path if self.path is not None else "the model"
        c = self.info.get("calibration")  # read, not copied: the merge below is a new dict
        if c is None:
            raise UsageError(f"{name} is not calibrated: run `stad calibrate --model {name}` "
                             "(or model.calibrate(normal_images)) first")
        checked = stored_rule(c, name)
        return {**c, **checked}, self._score.model_copy(update={
            "image_score": checked["image_score"], "topk_fraction": checked["topk_fraction"]})

    def iter_score(self, images: Iterable[ImageInput], *, threshold: float | None = None
                   ) -> Iterator[Result]:
        """:meth:`score` of each image (or of one image), yielded as each batch finishes (for
        long lists; the images are listed first, so a generator is read in full).

        An uncalibrated model, a bad threshold or images that are not images raise here, at
        the call; an unreadable image raises when the iteration reaches it."""
        calibration, rule = self.score_rule()
        threshold = calibration["threshold"] if threshold is None else _threshold_value(threshold)
        pixel = calibration.get("pixel_threshold")
        listed = _image_list(images)
        return (Result.of(maps, rule, threshold, pixel)
                for maps in iter_maps(self.networks, listed, device=self.device))

    @overload
    def score(self, images: str | os.PathLike[str] | Image.Image, *,
              threshold: float | None = None) -> Result: ...

    @overload
    def score(self, images: np.ndarray, *,  # type: ignore[overload-overlap]
              threshold: float | None = None) -> Result | list[Result]: ...

    @overload
    def score(self, images: Iterable[ImageInput], *,
              threshold: float | None = None) -> list[Result]: ...

    def score(self, images: ImageInput | Iterable[ImageInput], *,
              threshold: float | None = None) -> Result | list[Result]:
        """Score one image (a :class:`Result`) or a list of them (a list, in order).

        ``threshold`` replaces the calibrated one for this call. An unreadable image raises
        :class:`~stad.errors.DataError` naming it; an uncalibrated model raises
        :class:`~stad.errors.UsageError`.
        """
        if _is_single(images):
            return next(self.iter_score(images, threshold=threshold))
        return list(self.iter_score(images, threshold=threshold))

    def calibrate(self, normal_images: Iterable[ImageInput], *,
                  method: Literal["fpr", "f1", "manual"] = "fpr", target_fpr: float = 0.01,
                  threshold: float | None = None,
                  normalize: Literal["global", "position"] = "position",
                  target_pixel_fpr: float = 0.001,
                  smooth_sigma: float | Literal["auto"] = "auto",
                  variance_weight: float = 0.0,
                  tta: TtaName = "none",
                  test_images: Iterable[ImageInput] | None = None,
                  test_labels: Iterable[bool] | None = None, source: str = "given images",
                  reporter: Reporter = NULL_REPORTER) -> dict[str, Any]:
        """Calibrate on anomaly-free images (docs/method.md §5), in memory; :meth:`save` keeps it.

        The statistics that standardize e and v come from ``normal_images`` (globally, or per
        map position with ``normalize="position"``). The threshold: ``"fpr"`` lets at most
        ``target_fpr`` of those images score above it; ``"f1"`` maximizes F1 on
        ``test_images`` with ``test_labels`` (True: anomalous); ``"manual"`` takes
        ``threshold``. The pixel threshold (defect regions, masks) lets at most
        ``target_pixel_fpr`` of the normal images' pixels above it. Each scale's map is
        smoothed with a Gaussian of ``smooth_sigma`` pixels (of the model's image size;
        ``"auto"``: the image size / 64) before the fusion, here and in every map scored with
        this calibration. Each scale's score is ẽ + w·ṽ with w = ``variance_weight``: 0 (the
        default) scores by the students' regression error alone, 1 adds their predictive
        variance as the paper does. ``tta`` averages each scale's error and variance over
        views of the image (:data:`stad.model.TTA`: ``"hflip"`` adds its left-right mirror,
        ``"vflip"`` its upside-down mirror, ``"flips"`` both and the turn by 180°,
        ``"dihedral"`` also the turns by 90°), here and in every later map, at that many
        times the cost; only where normal images look the same under those views (textures).
        ``normal_images`` and ``test_images`` are lists as :meth:`score` takes them (one image
        counts as a list of one). Returns a copy of what is recorded as ``info["calibration"]``
        (with the σ used, a number).
        """
        self._refuse_onnx("calibrated")
        cfg = _settings(None, {"calibrate": {
            "threshold_method": method, "target_fpr": target_fpr, "threshold": threshold,
            "normalize": normalize, "target_pixel_fpr": target_pixel_fpr,
            "smooth_sigma": smooth_sigma, "variance_weight": variance_weight,
            "tta": tta}}).calibrate
        check_threshold_method(method, cfg.threshold)
        normal_images = _image_list(normal_images)
        if not normal_images:
            raise UsageError("normal_images is empty: calibrating needs anomaly-free images")
        if test_images is not None:
            test_images = _image_list(test_images)
        if test_labels is not None:
            test_labels = list(test_labels)
            odd = next((t for t in test_labels
                        if not isinstance(t, bool | np.bool_) and t not in (0, 1)), None)
            if odd is not None:  # bool("good") is True: every image would count as anomalous
                raise UsageError(f"test_labels are True (anomalous) or False (normal), not "
                                 f"{odd!r}")
        if method == "f1" and (test_images is None or test_labels is None
                               or len(test_images) != len(test_labels)):
            raise UsageError("threshold method 'f1' needs test_images and as many test_labels")
        # Calibrated in place: a failure (an f1 split of one class, say) puts back what was.
        saved = {k: (sc.calib, sc.calib_map) for k, sc in self.networks.scales.items()}
        saved_sigma = self.networks.smooth_sigma
        saved_weight = self.networks.variance_weight
        saved_tta = self.networks.tta
        try:
            stats, normal_scores, pixel_threshold = calibrate_model(
                self.networks, normal_images, self._score, device=self.device,
                normalize=cfg.normalize, pixel_fpr=cfg.target_pixel_fpr,
                smooth_sigma=cfg.smooth_sigma, variance_weight=cfg.variance_weight,
                tta=cfg.tta, reporter=reporter)
            chosen = self._threshold(cfg, normal_scores, test_images, test_labels, reporter)
        except BaseException:
            for k, (calib, calib_map) in saved.items():
                self.networks.scales[k].calib, self.networks.scales[k].calib_map = calib, \
                    calib_map
            self.networks.smooth_sigma = saved_sigma
            self.networks.variance_weight = saved_weight
            self.networks.tta = saved_tta
            raise
        self.info["calibration"] = {
            "method": method, "threshold": chosen,
            "target_fpr": cfg.target_fpr if method == "fpr" else None,
            "image_score": self._score.image_score, "topk_fraction": self._score.topk_fraction,
            "normalize": cfg.normalize, "smooth_sigma": self.networks.smooth_sigma,
            "variance_weight": self.networks.variance_weight, "tta": self.networks.tta,
            "n_images": len(normal_scores), "images_source": source,
            "statistics": {k: dict(zip(("e_mean", "e_std", "v_mean", "v_std"),
                                       s.tolist(), strict=True))
                           for k, s in stats.items()},
            "normal_scores": {"min": min(normal_scores), "max": max(normal_scores)},
            "pixel_threshold": pixel_threshold, "target_pixel_fpr": cfg.target_pixel_fpr,
        }
        self.config = {**self.config, "calibrate": cfg.model_dump(mode="json"),
                       "score": self._score.model_dump(mode="json")}
        return copy.deepcopy(self.info["calibration"])

    def _threshold(self, cfg: Any, normal_scores: list[float],
                   test_images: Sequence[ImageInput] | None,
                   test_labels: Sequence[bool] | None, reporter: Reporter) -> float:
        if cfg.threshold_method == "manual":
            assert cfg.threshold is not None
            return float(cfg.threshold)
        if cfg.threshold_method == "fpr":
            return fpr_threshold(normal_scores, cfg.target_fpr)
        assert test_images is not None and test_labels is not None
        scores = [image_score(m.maps["fused"], self._score)
                  for m in iter_maps(self.networks, test_images, device=self.device,
                                     reporter=reporter, what="test scores")]
        return f1_threshold(scores, [bool(t) for t in test_labels])

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the model artifact (atomically, locked against a second writer) to ``path``,
        by default the file it was loaded from. Returns where it was written."""
        self._refuse_onnx("saved")
        target = Path(path) if path is not None else self.path
        if target is None:
            raise UsageError("Model.save needs a path: this model was not loaded from a file")
        check_artifact_name(target)  # before the lock makes its folder
        with output_lock(target):
            save_model(target, self.networks, Settings.model_validate(self.config), self.info)
        return target

    @property
    def onnx(self) -> bool:
        """Whether this is an exported ONNX model (scored with onnxruntime)."""
        return "onnx" in self.info

    def _refuse_onnx(self, what: str) -> None:
        if self.onnx:
            raise UsageError(f"{self.path} is an exported ONNX model and cannot be {what}: "
                             "do it with the .safetensors model and export again")

    def export(self, out: str | os.PathLike[str], *, format: str = "onnx",
               quantize: Literal["int8"] | None = None,
               calibration_images: Sequence[ImageInput] = ()) -> dict[str, Any]:
        """Write the model as one ONNX graph (``stad export``; :mod:`stad.export`).

        ``quantize="int8"``: the convolutions in int8, their activation ranges measured on
        ``calibration_images`` (anomaly-free; ``stad export`` uses the held-back ones)."""
        from stad.export import check_format, export_onnx

        self._refuse_onnx("exported")
        check_format(format)
        return export_onnx(self, Path(out), quantize=quantize,
                           calibration_images=_image_list(calibration_images))

    def __repr__(self) -> str:
        state = "calibrated" if self.info.get("calibration") else "not calibrated"
        backend = ", onnxruntime" if self.onnx else ""
        return (f"stad.Model({str(self.path)!r}, scales={self.scales}, "
                f"image_size={self.image_size}, {state}{backend})")


def _image_list(images: Any) -> list[Any]:
    """Images as a list: one image (a path, a PIL image, an (H, W[, C]) array) is a list of one;
    an (N, H, W, C) array or any other iterable (a generator too) is listed."""
    if isinstance(images, bytes | bytearray | Mapping) or hasattr(images, "read"):
        # Iterable, but not images: they were read as lists of ints, keys or lines.
        raise UsageError(f"images are paths, PIL images or arrays, or a list of them, not "
                         f"{type(images).__name__} (open bytes or a file object with "
                         "PIL.Image.open first)")
    listed = [images] if _is_single(images) else list(images)
    for item in listed:
        if is_path(item) and not os.fspath(item).strip():
            raise UsageError("an image path is empty (an unset variable?)")
    return listed


def _threshold_value(threshold: Any) -> float:
    """A threshold given in a call, as a finite float (a NumPy scalar or an int is fine)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(threshold, (bool, str, bytes)) or not math.isfinite(value):
        raise UsageError(f"threshold must be a finite number, got {threshold!r}")
    return value


def _is_single(images: Any) -> bool:
    """One image: a path, a PIL image, an array of fewer than 4 dimensions, or anything not
    iterable (which as_rgb names and refuses); a collection is anything else iterable."""
    if is_path(images) or isinstance(images, Image.Image):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim < 4
    return not isinstance(images, Iterable)


def load_model(path: str | os.PathLike[str], *, device: str = "auto", **score: Any) -> Model:
    """Load a model artifact (from ``stad fit-students``, calibrated by ``stad calibrate``).

    Args:
        path: the ``.safetensors`` model file.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        score: ``score`` settings: ``batch_size``, ``tile_size``, ``precision``, ``fused``
            (how maps are computed), ``image_score`` and ``topk_fraction`` (used by
            :meth:`Model.calibrate`; a calibrated model keeps the rule it was calibrated with).
    """
    return Model.load(path, device=device, score=_settings(None, {"score": score}).score)


# ---- the steps of the command line, with keyword settings ------------------------------------


def _settings(settings: Settings | None, keywords: Mapping[str, Any]) -> Settings:
    """``settings`` (or the defaults) with ``keywords`` on top, merged at every depth and
    validated; no environment or file. A value given as None stays None (``tile_size=None``:
    never tiled). The students' preset fills in what was not given, for the preset in force
    after the merge (values a preset wrote into ``settings`` are not taken as given)."""
    base = settings.model_dump(mode="json", exclude_unset=True) if settings is not None else {}
    students = base.get("students")
    if isinstance(students, dict) and students.get("preset") in STUDENT_PRESETS:
        filled = dict(STUDENT_PRESETS[students["preset"]])
        if "image_size" in students:  # the preset's scales as it fitted them to that size
            with contextlib.suppress(ValueError):
                filled["patch_sizes"] = preset_scales_at(students["preset"],
                                                         students["image_size"])
        base["students"] = {k: v for k, v in students.items()
                            if k == "preset" or filled.get(k, object()) != v}
    return settings_from(merge(base, keywords))


def pretrain_teacher(out: str | os.PathLike[str], *, settings: Settings | None = None,
                     resume: bool = False, reporter: Reporter = NULL_REPORTER,
                     **keywords: Any) -> dict[str, Any]:
    """``stad pretrain-teacher``: pretrain teachers on a dataset's training images and write
    the teacher artifact to ``out``. Returns what the command prints."""
    from stad.commands.train import pretrain_teacher as run

    return run(_settings(settings, keywords), out=Path(out), resume=resume, reporter=reporter)


def fit_students(out: str | os.PathLike[str], *, teacher: str | os.PathLike[str] | None = None,
                 settings: Settings | None = None, resume: bool = False,
                 reporter: Reporter = NULL_REPORTER, **keywords: Any) -> dict[str, Any]:
    """``stad fit-students``: fit the student ensembles and write the model artifact to
    ``out``. ``teacher``: a teacher or model artifact, ``"random"``, or None for the
    shipped teacher (here the name is that of ``--teacher``, not of the ``teacher`` settings
    section, which only ``pretrain_teacher`` uses)."""
    from stad.commands.train import fit_students as run

    name = None if teacher is None else os.fspath(teacher)
    return run(_settings(settings, keywords), teacher=name, out=Path(out), resume=resume,
               reporter=reporter)


def calibrate(model: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
              settings: Settings | None = None, reporter: Reporter = NULL_REPORTER,
              **keywords: Any) -> dict[str, Any]:
    """``stad calibrate``: calibrate the model file on the validation images recorded in it
    and store the calibration (in ``out``, or in place)."""
    from stad.commands.calibrate import calibrate as run

    return run(_settings(settings, keywords), model_path=Path(model),
               out=None if out is None else Path(out), reporter=reporter)


def evaluate(model: str | os.PathLike[str], *, report: str | os.PathLike[str] | None = None,
             settings: Settings | None = None, reporter: Reporter = NULL_REPORTER,
             **keywords: Any) -> dict[str, Any]:
    """``stad evaluate``: metrics of the model on its dataset's labelled test split (and a
    report folder with ``report``)."""
    from stad.commands.evaluate import evaluate as run

    return run(_settings(settings, keywords), model_path=Path(model),
               report=None if report is None else Path(report), reporter=reporter)


def merge_models(models: Sequence[str | os.PathLike[str]], *, out: str | os.PathLike[str]
                 ) -> dict[str, Any]:
    """``stad merge-models``: one model from models fitted on the same data with the same
    settings but other patch sizes (e.g. one scale per process, or p = 65 added later), written
    uncalibrated to ``out``; calibrate it next."""
    from stad.commands.merge import merge_models as run

    if isinstance(models, (str, os.PathLike)):
        raise UsageError(f"merge_models takes a list of model files, not one: {models}")
    return run([Path(m) for m in models], out=Path(out))

"""Tests of the built-in ``folder`` adapter (stad/datasets/folder.py) on tiny folder trees.

Every test writes its own 8×8 PNGs with Pillow from a seeded numpy generator. The pairing rule
under test (docs/datasets.md): the mask of ``test/anomalous/[DEFECT/]NAME.EXT`` is
``masks/[DEFECT/]NAME.png`` or ``masks/[DEFECT/]NAME_mask.png`` (any image suffix).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stad.cli import app
from stad.datasets.base import Sample
from stad.datasets.folder import FolderAdapter
from stad.errors import DataError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STAD_") and n != "STAD_CACHE"]:
        monkeypatch.delenv(name)


def _png(path: Path, rng: np.random.Generator, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, rng: np.random.Generator, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = (rng.random((size, size)) > 0.7).astype(np.uint8) * 255
    Image.fromarray(values, mode="L").save(path)
    return path


def _normal_parts(base: Path, rng: np.random.Generator, *, n_train: int = 3, n_val: int = 0,
                  n_normal: int = 0) -> None:
    for i in range(n_train):
        _png(base / "train" / f"t{i}.png", rng)
    for i in range(n_val):
        _png(base / "val" / f"v{i}.png", rng)
    for i in range(n_normal):
        _png(base / "test" / "normal" / f"n{i}.png", rng)


def _samples(root: Path, category: str, split: str) -> list[Sample]:
    return list(FolderAdapter().samples(root, category, split))  # type: ignore[arg-type]


def _anomalous(root: Path, category: str = "parts") -> list[Sample]:
    return [s for s in _samples(root, category, "test") if s.label == "anomalous"]


# ---- layouts -----------------------------------------------------------------------------------


def test_splits_and_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = tmp_path / "parts"
    _normal_parts(base, rng, n_train=3, n_val=2, n_normal=2)
    for i in range(2):
        _png(base / "test" / "anomalous" / f"a{i}.png", rng)
    train = _samples(tmp_path, "parts", "train")
    val = _samples(tmp_path, "parts", "val")
    test = _samples(tmp_path, "parts", "test")
    assert [s.image.name for s in train] == ["t0.png", "t1.png", "t2.png"]
    assert [s.image.name for s in val] == ["v0.png", "v1.png"]
    assert all(s.label == "normal" and s.mask is None for s in train + val)
    assert [(s.image.name, s.label, s.defect) for s in test] == [
        ("n0.png", "normal", "good"), ("n1.png", "normal", "good"),
        ("a0.png", "anomalous", "anomalous"), ("a1.png", "anomalous", "anomalous")]


def test_only_train(tmp_path: Path) -> None:
    _normal_parts(tmp_path / "parts", np.random.default_rng(1), n_train=2)
    assert _samples(tmp_path, "parts", "val") == []
    assert _samples(tmp_path, "parts", "test") == []
    assert FolderAdapter().categories(tmp_path) == ["parts"]


def test_no_masks_folder_means_no_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "flat.png", rng)
    _png(base / "test" / "anomalous" / "dent" / "d0.png", rng)
    anomalous = _anomalous(tmp_path)
    assert [(s.image.name, s.defect, s.mask) for s in anomalous] == [
        ("flat.png", "anomalous", None), ("d0.png", "dent", None)]


@pytest.mark.parametrize("mask_name", ["{stem}.png", "{stem}_mask.png", "{stem}_mask.bmp"])
def test_flat_layout_with_masks(tmp_path: Path, mask_name: str) -> None:
    rng = np.random.default_rng(3)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    for stem in ("a0", "a1"):
        _png(base / "test" / "anomalous" / f"{stem}.jpg", rng)
        _mask(base / "masks" / mask_name.format(stem=stem), rng)
    anomalous = _anomalous(tmp_path)
    assert [(s.image.name, s.defect) for s in anomalous] == [("a0.jpg", "anomalous"),
                                                             ("a1.jpg", "anomalous")]
    for s in anomalous:
        assert s.mask == base / "masks" / mask_name.format(stem=s.image.stem)


def test_per_defect_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base = tmp_path / "parts"
    _normal_parts(base, rng, n_normal=1)
    for defect, n in (("crack", 2), ("dent", 1)):
        for i in range(n):
            _png(base / "test" / "anomalous" / defect / f"{i}.png", rng)
            _mask(base / "masks" / defect / f"{i}_mask.png", rng)
    _png(base / "test" / "anomalous" / "loose.png", rng)
    _mask(base / "masks" / "loose.png", rng)
    anomalous = _anomalous(tmp_path)
    assert sorted((s.defect, s.image.name) for s in anomalous) == [
        ("anomalous", "loose.png"), ("crack", "0.png"), ("crack", "1.png"), ("dent", "0.png")]
    for s in anomalous:
        folder = base / "masks" if s.defect == "anomalous" else base / "masks" / s.defect
        assert s.mask is not None and s.mask.parent == folder
        assert s.mask.name in (f"{s.image.stem}.png", f"{s.image.stem}_mask.png")


def test_summary_through_the_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = tmp_path / "parts"
    _normal_parts(base, rng, n_train=2, n_val=1, n_normal=1)
    _png(base / "test" / "anomalous" / "crack" / "0.png", rng)
    _mask(base / "masks" / "crack" / "0.png", rng)
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "folder", "--root",
                                      str(tmp_path), "--category", "parts", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["splits"]["train"]["images"] == 2
    assert summary["splits"]["val"]["images"] == 1
    assert summary["splits"]["test"] == {"images": 2, "normal": 1, "anomalous": 1, "masks": 1,
                                         "defects": {"crack": 1, "good": 1}}


# ---- pairing errors ----------------------------------------------------------------------------


def test_missing_mask_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "a0.png", rng)
    lonely = _png(base / "test" / "anomalous" / "a1.png", rng)
    _mask(base / "masks" / "a0.png", rng)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "parts", "test")
    assert str(lonely) in str(info.value) and "without a mask" in str(info.value)


def test_missing_defect_mask_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "a0.png", rng)
    _mask(base / "masks" / "a0.png", rng)
    lonely = _png(base / "test" / "anomalous" / "dent" / "d0.png", rng)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "parts", "test")
    assert str(lonely) in str(info.value)


def test_extra_mask_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "a0.png", rng)
    _mask(base / "masks" / "a0.png", rng)
    extra = _mask(base / "masks" / "zz_mask.png", rng)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "parts", "test")
    assert str(extra) in str(info.value) and "without an image" in str(info.value)


def test_extra_mask_in_a_defect_folder_without_images(tmp_path: Path) -> None:
    # "every mask an image" (docs/datasets.md): masks/DEFECT/ with no test/anomalous/DEFECT/.
    rng = np.random.default_rng(9)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "a0.png", rng)
    _mask(base / "masks" / "a0.png", rng)
    orphan = _mask(base / "masks" / "scratch" / "s0_mask.png", rng)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "parts", "test")
    assert str(orphan) in str(info.value)


def test_ambiguous_masks_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "a0.png", rng)
    first = _mask(base / "masks" / "a0.png", rng)
    second = _mask(base / "masks" / "a0_mask.png", rng)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "parts", "test")
    message = str(info.value)
    assert "several masks" in message and str(first) in message and str(second) in message


def test_pairing_error_through_the_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "unpaired_image.png", rng)
    (base / "masks").mkdir()
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "folder", "--root",
                                      str(tmp_path), "--category", "parts"])
    assert result.exit_code == 3
    assert result.stderr.startswith("stad: error:") and "unpaired_image.png" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- roots, categories and stray files ---------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        _samples(root, "parts", "train")
    with pytest.raises(DataError, match="nowhere"):
        FolderAdapter().categories(root)


def test_missing_category_lists_the_found_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    _normal_parts(tmp_path / "screws", rng, n_train=1)
    _normal_parts(tmp_path / "nuts", rng, n_train=1)
    (tmp_path / "bolts" / "test").mkdir(parents=True)  # no train/: not a category
    assert FolderAdapter().categories(tmp_path) == ["nuts", "screws"]
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bolts", "train")
    assert "'bolts'" in str(info.value) and "nuts, screws" in str(info.value)


def test_hidden_and_non_image_files_are_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    base = tmp_path / "parts"
    _normal_parts(base, rng, n_train=2)
    _png(base / "train" / ".hidden.png", rng)
    (base / "train" / "notes.txt").write_text("camera 3")
    _png(base / "test" / "anomalous" / "a0.png", rng)
    (base / "test" / "anomalous" / ".DS_Store").write_bytes(b"\0" * 8)
    (base / "test" / "anomalous" / "labels.csv").write_text("a0,scratch\n")
    _mask(base / "masks" / "a0.png", rng)
    _mask(base / "masks" / ".a0_mask.png", rng)  # hidden: not a second mask of a0
    (base / "masks" / "Thumbs.db").write_bytes(b"\0" * 8)
    assert [s.image.name for s in _samples(tmp_path, "parts", "train")] == ["t0.png", "t1.png"]
    anomalous = _anomalous(tmp_path)
    assert [(s.image.name, s.mask) for s in anomalous] == [("a0.png", base / "masks" / "a0.png")]


def test_a_defect_folder_named_good_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    base = tmp_path / "parts"
    _normal_parts(base, rng)
    _png(base / "test" / "anomalous" / "good" / "0.png", rng)
    with pytest.raises(DataError, match=r"anomalous/good: a defect type may not be named 'good'"):
        _anomalous(tmp_path)

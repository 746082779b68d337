"""Tests of the built-in ``mvtec`` adapter (stad/datasets/mvtec.py) on tiny MVTec-layout trees.

Every test writes its own 8×8 PNGs with Pillow from a seeded numpy generator; masks are 8-bit
``L`` images holding 0 and 255, named ``ground_truth/DEFECT/NAME_mask.png`` as in MVTec AD.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from stad.cli import app
from stad.config import resolve_settings
from stad.datasets.base import Sample
from stad.datasets.mvtec import MVTecAdapter
from stad.datasets.selection import select_data, summarize
from stad.errors import DataError, UsageError


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


def make_mvtec(root: Path, category: str = "bottle", *, seed: int = 0, n_train: int = 3,
               n_val: int = 0, n_good: int = 2,
               defects: dict[str, int] | None = None) -> Path:
    """An MVTec-layout category; returns its folder."""
    rng = np.random.default_rng(seed)
    base = root / category
    for i in range(n_train):
        _png(base / "train" / "good" / f"{i:03d}.png", rng)
    for i in range(n_val):
        _png(base / "val" / "good" / f"{i:03d}.png", rng)
    for i in range(n_good):
        _png(base / "test" / "good" / f"{i:03d}.png", rng)
    for defect, n in (defects if defects is not None else {"crack": 2, "scratch": 1}).items():
        for i in range(n):
            _png(base / "test" / defect / f"{i:03d}.png", rng)
            _mask(base / "ground_truth" / defect / f"{i:03d}_mask.png", rng)
    return base


def _samples(root: Path, category: str, split: str) -> list[Sample]:
    return list(MVTecAdapter().samples(root, category, split))  # type: ignore[arg-type]


def _show(root: Path, category: str | None = "bottle") -> Result:
    args = ["datasets", "show", "--dataset", "mvtec", "--root", str(root)]
    if category is not None:
        args += ["--category", category]
    return CliRunner().invoke(app, [*args, "--json"])


# ---- a well-formed category --------------------------------------------------------------------


def test_categories(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle", seed=1)
    make_mvtec(tmp_path, "cable", seed=2)
    (tmp_path / "not_a_category" / "test").mkdir(parents=True)
    (tmp_path / "license.txt").write_text("CC BY-NC-SA 4.0")
    assert MVTecAdapter().categories(tmp_path) == ["bottle", "cable"]


def test_counts_labels_and_pairing(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=3, n_train=3, n_val=2, n_good=2,
                      defects={"crack": 2, "scratch": 1})
    train = _samples(tmp_path, "bottle", "train")
    val = _samples(tmp_path, "bottle", "val")
    test = _samples(tmp_path, "bottle", "test")
    assert [s.image.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == "normal" and s.mask is None and s.defect == "good" for s in train + val)
    assert {s.split for s in train} == {"train"} and {s.split for s in val} == {"val"}
    assert len(val) == 2
    assert len(test) == 5
    normal = [s for s in test if s.label == "normal"]
    anomalous = [s for s in test if s.label == "anomalous"]
    assert len(normal) == 2 and all(s.mask is None and s.defect == "good" for s in normal)
    assert sorted((s.defect, s.image.name) for s in anomalous) == [
        ("crack", "000.png"), ("crack", "001.png"), ("scratch", "000.png")]
    for s in anomalous:
        assert s.mask == base / "ground_truth" / s.defect / f"{s.image.stem}_mask.png"
        assert s.image == base / "test" / s.defect / s.image.name


def test_order_is_stable(tmp_path: Path) -> None:
    make_mvtec(tmp_path, seed=4, defects={"b": 2, "a": 2})
    first = _samples(tmp_path, "bottle", "test")
    assert first == _samples(tmp_path, "bottle", "test")
    assert [s.defect for s in first] == ["a", "a", "b", "b", "good", "good"]


def test_without_val_or_test(tmp_path: Path) -> None:
    make_mvtec(tmp_path, seed=5, n_val=0, n_good=0, defects={})
    assert _samples(tmp_path, "bottle", "val") == []
    assert _samples(tmp_path, "bottle", "test") == []
    assert len(_samples(tmp_path, "bottle", "train")) == 3


def test_summary_through_the_cli(tmp_path: Path) -> None:
    make_mvtec(tmp_path, seed=6, n_train=3, n_val=1, n_good=2, defects={"crack": 2, "hole": 1})
    result = _show(tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["schema_version"] == 1
    assert summary["dataset"] == "mvtec" and summary["category"] == "bottle"
    assert summary["splits"]["train"] == {"images": 3, "normal": 3, "anomalous": 0, "masks": 0,
                                          "defects": {"good": 3}}
    assert summary["splits"]["val"]["images"] == 1
    assert summary["splits"]["test"] == {"images": 5, "normal": 2, "anomalous": 3, "masks": 3,
                                         "defects": {"crack": 2, "good": 2, "hole": 1}}


def test_summarize_matches_the_adapter(tmp_path: Path) -> None:
    make_mvtec(tmp_path, seed=7)
    settings = resolve_settings({"dataset": "mvtec", "root": tmp_path, "category": "bottle"},
                                environ={})
    summary = summarize(select_data(settings))
    assert summary["splits"]["test"]["images"] == len(_samples(tmp_path, "bottle", "test"))


# ---- pairing errors ----------------------------------------------------------------------------


def test_missing_mask_is_named(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=8)
    (base / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bottle", "test")
    message = str(info.value)
    assert str(base / "test" / "crack" / "001.png") in message
    assert "without a mask" in message


def test_masks_of_normal_images_and_links_to_nothing_are_named(tmp_path: Path) -> None:
    # Both were skipped without a word: a mask in ground_truth/good (MVTec AD gives normal
    # images none, so it marked nothing), and an image that is a link to a missing file.
    base = make_mvtec(tmp_path, seed=9)
    _mask(base / "ground_truth" / "good" / "000_mask.png", np.random.default_rng(0))
    with pytest.raises(DataError, match=r"masks in ground_truth/good \(normal images have "
                                        r"none.*000_mask\.png"):
        _samples(tmp_path, "bottle", "test")
    (base / "ground_truth" / "good" / "000_mask.png").unlink()
    (base / "train" / "good" / "zzz.png").symlink_to(tmp_path / "gone.png")
    assert base / "train" / "good" / "zzz.png" in [s.image for s in
                                                    _samples(tmp_path, "bottle", "train")]
    result = _show(tmp_path)
    assert result.exit_code == 3 and "zzz.png" in result.stderr


def test_upper_case_suffixes_pair_as_image_suffixes_are_read(tmp_path: Path) -> None:
    # Windows tools write 000.PNG and 000_mask.PNG; the images were read, their masks not
    base = make_mvtec(tmp_path, seed=8, defects={"crack": 2})
    for name in ("000", "001"):
        (base / "ground_truth" / "crack" / f"{name}_mask.png").rename(
            base / "ground_truth" / "crack" / f"{name}_mask.PNG")
    (base / "test" / "crack" / "001.png").rename(base / "test" / "crack" / "001.PNG")
    anomalous = [s for s in _samples(tmp_path, "bottle", "test") if s.label == "anomalous"]
    assert [(s.image.name, s.mask.name if s.mask else None) for s in anomalous] == \
        [("000.png", "000_mask.PNG"), ("001.PNG", "001_mask.PNG")]
    # two masks of one name in two cases: one of them has no image, as any extra mask
    _mask(base / "ground_truth" / "crack" / "000_mask.png", np.random.default_rng(1))
    with pytest.raises(DataError, match="masks without an image"):
        _samples(tmp_path, "bottle", "test")


def test_a_category_typed_with_a_trailing_slash_is_the_folder(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    settings = resolve_settings({"dataset": "mvtec", "root": str(tmp_path),
                                 "category": "bottle/"}, environ={})
    assert select_data(settings).category == "bottle"


def test_a_root_that_is_the_category_folder_says_so(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    make_mvtec(tmp_path)
    with pytest.raises(DataError, match=f"is a category folder itself: pass --root {tmp_path}$"):
        _samples(tmp_path / "bottle", "bottle", "train")
    monkeypatch.chdir(tmp_path / "bottle")  # --root . inside the category: its parent, named
    with pytest.raises(DataError, match=f"is a category folder itself: pass --root {tmp_path}$"):
        _samples(Path("."), "bottle", "train")


def test_the_model_records_the_root_absolute(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A relative --root recorded as typed was looked for again from wherever the next
    # command ran (calibrate from another folder: "does not exist", or another set's images)
    from stad.commands.common import data_info

    make_mvtec(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    settings = resolve_settings({"dataset": "mvtec", "root": "data", "category": "bottle"},
                                environ={})
    assert data_info(select_data(settings))["root"] == str(tmp_path / "data")


def test_other_data_than_the_model_was_fitted_on_is_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stad.commands.common import with_model_data

    info = {"data": {"dataset": "mvtec", "root": str(tmp_path), "category": "bottle"}}
    chosen = with_model_data(resolve_settings({}, environ={}), info)
    assert (chosen.dataset, chosen.category, str(chosen.root)) == ("mvtec", "bottle",
                                                                   str(tmp_path))
    assert capsys.readouterr().err == ""
    # STAD_CATEGORY exported for another job: used, and said
    chosen = with_model_data(resolve_settings({}, environ={"STAD_CATEGORY": "grid"}), info)
    assert chosen.category == "grid"
    err = capsys.readouterr().err
    assert "fitted on category 'bottle'" in err and "'grid'" in err and "STAD_CATEGORY" in err
    # the same folder typed as a shell completes it: the same category, nothing to say
    chosen = with_model_data(resolve_settings({"category": "bottle/"}, environ={}), info)
    assert chosen.category == "bottle" and capsys.readouterr().err == ""
    from stad.errors import ArtifactError
    with pytest.raises(ArtifactError, match="malformed stad metadata: data"):
        with_model_data(resolve_settings({}, environ={}), {"data": "x"}, "m.safetensors")


def test_no_training_images_is_said_first(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, n_train=0)
    (base / "train" / "good").mkdir(parents=True)
    result = CliRunner().invoke(app, ["fit-students", "--dataset", "mvtec", "--root",
                                      str(tmp_path), "--category", "bottle", "--teacher",
                                      "random", "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 3 and "no training images in" in result.output
    assert "val_fraction" not in result.output


def test_extra_mask_is_named(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=9)
    extra = _mask(base / "ground_truth" / "scratch" / "007_mask.png", np.random.default_rng(9))
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bottle", "test")
    message = str(info.value)
    assert str(extra) in message and "without an image" in message


def test_mask_folder_of_a_defect_without_images(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=10)
    orphan = _mask(base / "ground_truth" / "stain" / "000_mask.png", np.random.default_rng(10))
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bottle", "test")
    assert str(orphan) in str(info.value)


def test_defect_images_without_any_mask_folder(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=11, defects={"crack": 1})
    _png(base / "test" / "dent" / "000.png", np.random.default_rng(11))
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bottle", "test")
    assert str(base / "test" / "dent" / "000.png") in str(info.value)


def test_missing_and_extra_reported_together(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=12, defects={"crack": 1})
    mask = base / "ground_truth" / "crack" / "000_mask.png"
    renamed = mask.rename(mask.with_name("000-mask.png"))
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bottle", "test")
    message = str(info.value)
    assert str(base / "test" / "crack" / "000.png") in message
    assert str(renamed) in message


def test_many_problems_are_summarized(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=13, defects={"crack": 8})
    for mask in (base / "ground_truth" / "crack").iterdir():
        mask.unlink()
    with pytest.raises(DataError, match="and 3 more"):
        _samples(tmp_path, "bottle", "test")


@pytest.mark.parametrize("problem", ["missing", "extra"])
def test_pairing_error_through_the_cli(tmp_path: Path, problem: str) -> None:
    base = make_mvtec(tmp_path, seed=14)
    if problem == "missing":
        (base / "ground_truth" / "scratch" / "000_mask.png").unlink()
        named = "000.png"
    else:
        _mask(base / "ground_truth" / "crack" / "042_mask.png", np.random.default_rng(14))
        named = "042_mask.png"
    result = _show(tmp_path)
    assert result.exit_code == 3
    stderr = result.stderr
    assert stderr.startswith("stad: error:") and len(stderr.strip().splitlines()) == 1
    assert named in stderr
    assert "Traceback" not in result.output


# ---- roots and categories ----------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        _samples(root, "bottle", "train")
    assert str(root) in str(info.value) and "--root" in str(info.value)
    with pytest.raises(DataError, match="nowhere"):
        MVTecAdapter().categories(root)


def test_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "mvtec.tar.xz"
    root.write_bytes(b"\xfd7zXZ")
    with pytest.raises(DataError, match="not a folder"):
        _samples(root, "bottle", "train")


def test_missing_category_lists_the_found_ones(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle", seed=15)
    make_mvtec(tmp_path, "cable", seed=16)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "botle", "test")
    message = str(info.value)
    assert "'botle'" in message and "bottle, cable" in message


def test_category_with_train_but_no_good_folder(tmp_path: Path) -> None:
    (tmp_path / "bottle" / "train").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        _samples(tmp_path, "bottle", "train")
    assert "bottle" in str(info.value)


def test_missing_root_and_category_through_the_cli(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle", seed=17)
    missing = _show(tmp_path / "nowhere")
    assert missing.exit_code == 3 and "nowhere" in missing.stderr
    only = _show(tmp_path, category=None)  # one category: nothing to choose
    assert only.exit_code == 0 and '"category": "bottle"' in only.stdout
    make_mvtec(tmp_path, "cable", seed=16)
    no_category = _show(tmp_path, category=None)
    assert no_category.exit_code == 2
    assert "--category" in no_category.stderr
    assert "bottle, cable" in no_category.stderr
    wrong = _show(tmp_path, category="bottel")
    assert wrong.exit_code == 3 and "bottel" in wrong.stderr


def test_no_root_given(tmp_path: Path) -> None:
    settings = resolve_settings({"dataset": "mvtec", "category": "bottle"}, environ={})
    with pytest.raises(UsageError, match="--root"):
        select_data(settings)


# ---- files that are not images -----------------------------------------------------------------


def test_hidden_and_non_image_files_are_skipped(tmp_path: Path) -> None:
    base = make_mvtec(tmp_path, seed=18, n_train=2, defects={"crack": 1})
    rng = np.random.default_rng(18)
    _png(base / "train" / "good" / ".hidden.png", rng)
    _png(base / "train" / "good" / "UPPER.PNG", rng)  # suffixes are case-insensitive
    (base / "train" / "good" / "notes.txt").write_text("taken on 2019-05-01")
    (base / "train" / "good" / "Thumbs.db").write_bytes(b"\0" * 16)
    (base / "train" / "good" / ".DS_Store").write_bytes(b"\0" * 16)
    (base / "test" / "crack" / "._000.png").write_bytes(b"\0\x05\x16\x07")  # AppleDouble
    (base / "ground_truth" / "crack" / ".DS_Store").write_bytes(b"\0" * 16)
    (base / "ground_truth" / "crack" / "README.md").write_text("masks")
    (base / "test" / "README.md").write_text("a file in test/, not a defect folder")
    train = _samples(tmp_path, "bottle", "train")
    assert [s.image.name for s in train] == ["000.png", "001.png", "UPPER.PNG"]
    test = _samples(tmp_path, "bottle", "test")
    assert sorted(s.image.name for s in test if s.label == "anomalous") == ["000.png"]


def test_hidden_folder_in_test_is_not_a_defect_type(tmp_path: Path) -> None:
    # Tools leave hidden folders behind (.ipynb_checkpoints, .thumbnails); like hidden files,
    # they are not part of the dataset and must not become defect types.
    base = make_mvtec(tmp_path, seed=19, defects={"crack": 1})
    _png(base / "test" / ".thumbnails" / "000.png", np.random.default_rng(19))
    test = _samples(tmp_path, "bottle", "test")
    assert {s.defect for s in test} == {"crack", "good"}


def test_hidden_folder_in_root_is_not_a_category(tmp_path: Path) -> None:
    make_mvtec(tmp_path, seed=20, defects={"crack": 1})
    _png(tmp_path / ".cache" / "train" / "good" / "000.png", np.random.default_rng(20))
    assert MVTecAdapter().categories(tmp_path) == ["bottle"]

"""Tests of the BTAD adapter on tiny folders made here, and of stad finding it once installed."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from stad.datasets import API_VERSION, Sample
from stad.errors import DataError

from stad_btad import BTADAdapter


def _image(path: Path, value: int = 128, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), value if mode == "L" else (value, value, value)).save(path)
    return path


def make_product(root: Path, product: str = "01", *, suffix: str = ".bmp",
                 mask_suffix: str = ".png", train: int = 3, test_ok: int = 2,
                 test_ko: int = 2) -> Path:
    """One BTAD product folder with ``test_ko`` defect images, each with its mask."""
    base = root / product
    for i in range(train):
        _image(base / "train" / "ok" / f"{i:04d}{suffix}")
    for i in range(test_ok):
        _image(base / "test" / "ok" / f"{i:04d}{suffix}")
    for i in range(test_ko):
        _image(base / "test" / "ko" / f"{i:04d}{suffix}", value=200)
        _image(base / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}", value=255, mode="L")
    return base


def test_counts_per_split(tmp_path: Path) -> None:
    make_product(tmp_path, train=3, test_ok=2, test_ko=4)
    adapter = BTADAdapter()

    train = list(adapter.samples(tmp_path, "01", "train"))
    assert len(train) == 3
    assert all(s.label == "normal" and s.mask is None and s.split == "train" for s in train)
    assert list(adapter.samples(tmp_path, "01", "val")) == []  # BTAD has no validation split

    test = list(adapter.samples(tmp_path, "01", "test"))
    assert [s.label for s in test] == ["normal"] * 2 + ["anomalous"] * 4
    assert all(s.defect == "good" and s.mask is None for s in test if s.label == "normal")
    assert all(s.defect == "ko" for s in test if s.label == "anomalous")
    assert all(isinstance(s, Sample) and s.split == "test" for s in test)


@pytest.mark.parametrize(("product", "suffix", "mask_suffix"),
                         [("01", ".bmp", ".png"), ("02", ".png", ".png"), ("03", ".bmp", ".bmp")])
def test_masks_pair_by_stem_whatever_the_suffix(tmp_path: Path, product: str, suffix: str,
                                                mask_suffix: str) -> None:
    base = make_product(tmp_path, product, suffix=suffix, mask_suffix=mask_suffix, test_ko=3)
    anomalous = [s for s in BTADAdapter().samples(tmp_path, product, "test")
                 if s.label == "anomalous"]
    assert [(s.image.name, s.mask.name if s.mask else None) for s in anomalous] == [
        (f"{i:04d}{suffix}", f"{i:04d}{mask_suffix}") for i in range(3)]
    assert all(s.mask is not None and s.mask.parent == base / "ground_truth" / "ko"
               for s in anomalous)


def test_order_is_sorted_and_stable(tmp_path: Path) -> None:
    base = make_product(tmp_path, train=0, test_ko=0)
    for name in ["b.bmp", "a.bmp", "a-1.bmp", "c.bmp"]:  # "a-1.bmp" sorts before "a.bmp"
        _image(base / "train" / "ok" / name)
        _image(base / "test" / "ko" / name)
        _image(base / "ground_truth" / "ko" / name.replace(".bmp", ".png"), mode="L")
    adapter = BTADAdapter()
    train = [s.image.name for s in adapter.samples(tmp_path, "01", "train")]
    ko = [s.image.name for s in adapter.samples(tmp_path, "01", "test") if s.defect == "ko"]
    assert train == ko == ["a-1.bmp", "a.bmp", "b.bmp", "c.bmp"]
    assert list(adapter.samples(tmp_path, "01", "test")) == \
        list(adapter.samples(tmp_path, "01", "test"))


def test_hidden_and_non_image_files_are_skipped(tmp_path: Path) -> None:
    base = make_product(tmp_path, train=2)
    (base / "train" / "ok" / "Thumbs.db").write_bytes(b"x")
    _image(base / "train" / "ok" / ".0000.bmp")
    (base / "ground_truth" / "ko" / "notes.txt").write_text("x")
    assert len(list(BTADAdapter().samples(tmp_path, "01", "train"))) == 2
    assert len(list(BTADAdapter().samples(tmp_path, "01", "test"))) == 4


def test_categories_are_the_product_folders(tmp_path: Path) -> None:
    for product in ["03", "01", "02"]:
        make_product(tmp_path, product)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "not-a-product").mkdir()
    assert BTADAdapter().categories(tmp_path) == ["01", "02", "03"]


def test_missing_mask_is_an_error_naming_the_image(tmp_path: Path) -> None:
    base = make_product(tmp_path, test_ko=3)
    (base / "ground_truth" / "ko" / "0001.png").unlink()
    with pytest.raises(DataError, match="without a mask") as err:
        list(BTADAdapter().samples(tmp_path, "01", "test"))
    assert str(base / "test" / "ko" / "0001.bmp") in str(err.value)
    assert "1 file(s)" in str(err.value)


def test_extra_mask_is_an_error_naming_the_mask(tmp_path: Path) -> None:
    base = make_product(tmp_path)
    extra = _image(base / "ground_truth" / "ko" / "0099.png", mode="L")
    with pytest.raises(DataError, match="masks without an image") as err:
        list(BTADAdapter().samples(tmp_path, "01", "test"))
    assert str(extra) in str(err.value)


def test_two_masks_for_one_image_is_an_error(tmp_path: Path) -> None:
    base = make_product(tmp_path)
    _image(base / "ground_truth" / "ko" / "0000.bmp", mode="L")  # beside 0000.png
    with pytest.raises(DataError, match="more than one") as err:
        list(BTADAdapter().samples(tmp_path, "01", "test"))
    assert "0000.bmp" in str(err.value) and "0000.png" in str(err.value)


def test_many_unpaired_images_are_counted_not_all_named(tmp_path: Path) -> None:
    base = make_product(tmp_path, test_ko=8)
    for mask in (base / "ground_truth" / "ko").iterdir():
        mask.unlink()
    with pytest.raises(DataError) as err:
        list(BTADAdapter().samples(tmp_path, "01", "test"))
    message = str(err.value)
    assert "8 file(s)" in message and "and 3 more" in message
    assert "0004.bmp" in message and "0005.bmp" not in message


def test_missing_category_lists_the_ones_found(tmp_path: Path) -> None:
    make_product(tmp_path, "01")
    make_product(tmp_path, "02", suffix=".png")
    with pytest.raises(DataError, match="'04' not found") as err:
        BTADAdapter().samples(tmp_path, "04", "train")
    assert str(tmp_path / "04") in str(err.value)
    assert "01, 02" in str(err.value)


def test_missing_root_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        BTADAdapter().categories(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        BTADAdapter().samples(missing, "01", "train")


def test_declares_the_contract() -> None:
    # A number written in the plugin, equal to the API of the stad it is tested with: when
    # stad's API_VERSION moves on, this fails until the plugin is brought up to date.
    assert type(BTADAdapter.api_version) is int and BTADAdapter.api_version == API_VERSION
    assert BTADAdapter.description


def _installed() -> bool:
    try:
        md.distribution("stad-btad")
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(),
                    reason="stad-btad is not installed (pip install -e plugins/stad-btad)")
def test_readme_commands_run(tmp_path: Path) -> None:
    """``stad datasets list`` and ``stad datasets show`` as the README shows them."""
    pytest.importorskip("stad.cli")
    make_product(tmp_path / "btad", "01", train=3, test_ok=2, test_ko=2)

    def stad(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stad", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    listed = stad("datasets", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert (rows["btad"]["distribution"], rows["btad"]["entry_point"],
            rows["btad"]["status"]) == ("stad-btad", "stad_btad:BTADAdapter", "ok")

    shown = stad("datasets", "show", "--dataset", "btad", "--root", "btad", "--category", "01",
                 "--json")
    assert shown.returncode == 0, shown.stderr
    splits = json.loads(shown.stdout)["splits"]
    assert [splits[s]["images"] for s in ("train", "val", "test")] == [3, 0, 4]
    assert splits["test"]["anomalous"] == splits["test"]["masks"] == 2

    missing = stad("datasets", "show", "--dataset", "btad", "--root", "btad", "--category", "09")
    assert missing.returncode == 3  # DataError: the data does not fit the layout
    assert "'09' not found" in missing.stderr

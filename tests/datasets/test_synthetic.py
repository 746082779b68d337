"""The synthetic dataset generator: layout, determinism, honest masks, regeneration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from stad.datasets.synthetic import (
    CATEGORIES,
    DEFECTS,
    GENERATOR_VERSION,
    MARKER,
    edge_px,
    ensure_generated,
    generate,
    render_sample,
)
from stad.errors import UsageError

# Small and fast: 8 images per category.
SMALL = {"image_size": 64, "n_train": 2, "n_val": 1, "n_test_good": 1, "n_test_per_defect": 1}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_layout_and_counts(tmp_path: Path) -> None:
    generate(tmp_path, seed=1, image_size=64, n_train=3, n_val=2, n_test_good=2,
             n_test_per_defect=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CATEGORIES)
    for category in CATEGORIES:
        cat = tmp_path / category
        assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == [
            "000.png", "001.png", "002.png"]
        assert len(list((cat / "val" / "good").iterdir())) == 2
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good", *DEFECTS))
        assert len(list((cat / "test" / "good").iterdir())) == 2
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(DEFECTS)
        for defect in DEFECTS:
            images = sorted(p.name for p in (cat / "test" / defect).iterdir())
            masks = sorted(p.name for p in (cat / "ground_truth" / defect).iterdir())
            assert images == ["000.png", "001.png"]
            assert masks == ["000_mask.png", "001_mask.png"]
        assert not list(cat.rglob("*.tmp"))
        for png in cat.rglob("*.png"):
            with Image.open(png) as img:
                assert img.size == (64, 64)
                assert img.mode == ("L" if png.name.endswith("_mask.png") else "RGB")


def test_masks_are_binary_non_empty_and_sized_like_their_image(tmp_path: Path) -> None:
    generate(tmp_path, seed=2, **{**SMALL, "n_test_per_defect": 3})
    for mask_path in tmp_path.rglob("*_mask.png"):
        mask = np.asarray(Image.open(mask_path))
        image_path = (mask_path.parent.parent.parent / "test" / mask_path.parent.name
                      / mask_path.name.replace("_mask", ""))
        assert mask.shape == np.asarray(Image.open(image_path)).shape[:2]
        assert set(np.unique(mask).tolist()) == {0, 255}, mask_path


def test_same_seed_and_params_give_byte_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=5, **SMALL)
    generate(tmp_path / "b", seed=5, **SMALL)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert a == b
    assert len(a) == len(CATEGORIES) * (2 + 1 + 1 + 2 * len(DEFECTS) + 1)  # + marker


def test_different_seeds_give_different_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=0, categories=["weave"], **SMALL)
    generate(tmp_path / "b", seed=1, categories=["weave"], **SMALL)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    pngs = [k for k in a if k.endswith(".png") and not k.endswith("_mask.png")]
    assert all(a[k] != b[k] for k in pngs)


def test_each_image_is_a_new_instance_of_the_texture() -> None:
    for category in CATEGORIES:
        first = render_sample(category, split="train", index=0, image_size=64)[1]
        second = render_sample(category, split="train", index=1, image_size=64)[1]
        held_out = render_sample(category, split="val", index=0, image_size=64)[1]
        assert not np.array_equal(first, second)
        assert not np.array_equal(first, held_out)


def test_test_images_do_not_depend_on_train_count(tmp_path: Path) -> None:
    generate(tmp_path / "a", categories=["grain"], **{**SMALL, "n_train": 2})
    generate(tmp_path / "b", categories=["grain"], **{**SMALL, "n_train": 5})
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    shared = [k for k in a if "/train/" not in k and not k.endswith(MARKER)]
    assert shared and all(a[k] == b[k] for k in shared)


def test_files_on_disk_are_what_render_sample_returns(tmp_path: Path) -> None:
    generate(tmp_path, seed=3, categories=["granite"], **SMALL)
    cat = tmp_path / "granite"
    _, image, mask = render_sample("granite", seed=3, split="test", defect="hole", index=0,
                                   image_size=64)
    assert np.array_equal(np.asarray(Image.open(cat / "test" / "hole" / "000.png")), image)
    assert np.array_equal(np.asarray(Image.open(cat / "ground_truth" / "hole" / "000_mask.png")),
                          mask)
    _, good, _ = render_sample("granite", seed=3, split="val", index=0, image_size=64)
    assert np.array_equal(np.asarray(Image.open(cat / "val" / "good" / "000.png")), good)


def test_good_samples_are_unchanged_and_unmasked() -> None:
    clean, image, mask = render_sample("weave", split="test", index=4, image_size=64)
    assert np.array_equal(clean, image)
    assert not mask.any()


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("category", CATEGORIES)
def test_mask_is_where_the_image_was_changed(category: str, defect: str) -> None:
    # Against the defect-free image drawn from the same stream. The blend threshold is
    # alpha >= 0.5 (docs/datasets-synthetic.md), hence the bounds below.
    for index in range(6):
        clean, image, mask = render_sample(category, seed=11, split="test", defect=defect,
                                           index=index, image_size=64)
        assert clean.shape == image.shape == (64, 64, 3) and mask.shape == (64, 64)
        inside = mask == 255
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert inside.sum() >= 0.002 * 64 * 64
        diff = np.abs(image.astype(int) - clean.astype(int))  # (64, 64, 3)
        # Inside: materially changed, almost every pixel.
        assert diff[inside].mean() >= 15
        assert (diff.max(axis=-1)[inside] > 0).mean() >= 0.95
        # Outside: less than half of any change (alpha < 0.5), and nothing at all beyond the
        # soft fringe of edge_px() pixels.
        assert diff.max(axis=-1)[~inside].max() <= 128
        near = ndimage.binary_dilation(inside, np.ones((3, 3), bool), edge_px(64))
        assert not diff[~near].any()


def test_ensure_generated_generates_once(tmp_path: Path) -> None:
    path = ensure_generated(tmp_path, "weave", seed=4, **SMALL)
    assert path == tmp_path / "weave"
    marker = json.loads((path / MARKER).read_text())
    assert marker["version"] == GENERATOR_VERSION
    assert marker["seed"] == 4 and marker["params"] == SMALL
    before = _mtimes(path)
    assert ensure_generated(tmp_path, "weave", seed=4, **SMALL) == path
    assert _mtimes(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["weave"]  # other categories untouched


def test_ensure_generated_regenerates_when_params_change(tmp_path: Path) -> None:
    path = ensure_generated(tmp_path, "grain", **{**SMALL, "n_test_per_defect": 3})
    assert (path / "test" / "stain" / "002.png").exists()
    ensure_generated(tmp_path, "grain", **{**SMALL, "image_size": 48})
    with Image.open(path / "train" / "good" / "000.png") as img:
        assert img.size == (48, 48)
    # Fewer images than before: the stale ones are gone, so no adapter lists them.
    assert sorted(p.name for p in (path / "test" / "stain").iterdir()) == ["000.png"]
    assert sorted(p.name for p in (path / "ground_truth" / "stain").iterdir()) == [
        "000_mask.png"]
    assert json.loads((path / MARKER).read_text())["params"]["image_size"] == 48
    first = (path / "val" / "good" / "000.png").read_bytes()
    ensure_generated(tmp_path, "grain", seed=9, **{**SMALL, "image_size": 48})
    assert (path / "val" / "good" / "000.png").read_bytes() != first


@pytest.mark.parametrize("damage", ["no marker", "bad marker", "missing image"])
def test_ensure_generated_repairs_an_incomplete_category(tmp_path: Path, damage: str) -> None:
    path = ensure_generated(tmp_path, "granite", **SMALL)
    expected = _hashes(path)
    if damage == "no marker":
        (path / MARKER).unlink()
    elif damage == "bad marker":
        (path / MARKER).write_text("{not json")
    else:
        (path / "test" / "paste" / "000.png").unlink()
    ensure_generated(tmp_path, "granite", **SMALL)
    assert _hashes(path) == expected


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown synthetic category 'carpet'"):
        generate(tmp_path, categories=["carpet"])
    with pytest.raises(UsageError, match="image_size"):
        ensure_generated(tmp_path, "weave", image_size=8)
    with pytest.raises(UsageError, match="n_val"):
        generate(tmp_path, n_val=-1)
    with pytest.raises(UsageError, match="seed"):
        generate(tmp_path, seed=-1)
    with pytest.raises(UsageError, match="defect"):
        render_sample("weave", split="train", defect="hole")
    assert not list(tmp_path.iterdir())

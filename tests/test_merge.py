"""``stad merge-models`` / :func:`stad.merge_models`: scales fitted in separate runs make the
model one run makes, and models that differ in anything but their scales are refused."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import stad
from stad.artifacts import Artifact, load_artifact, save_artifact
from stad.cli import app
from stad.datasets.synthetic import generate
from stad.errors import ArtifactError, UsageError

STUDENTS = {"epochs": 1, "image_size": 32, "n_students": 2}


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """p = 17 and p = 33 fitted alone and together, on the same tiny data and settings."""
    tmp = tmp_path_factory.mktemp("merge")
    generate(tmp / "data", categories=["grain"], image_size=32, n_train=6, n_val=2,
             n_test_good=2, n_test_per_defect=1, seed=1)
    for name, sizes in (("p17", [17]), ("p33", [33]), ("both", [17, 33])):
        stad.fit_students(tmp / f"{name}.safetensors", teacher="random", dataset="synthetic",
                          category="grain", root=tmp / "data",
                          students={**STUDENTS, "patch_sizes": sizes})
    return tmp


def test_separate_fits_merge_into_the_joint_fit(fits: Path) -> None:
    result = stad.merge_models([fits / "p33.safetensors", fits / "p17.safetensors"],
                               out=fits / "merged.safetensors")
    seconds = [load_artifact(fits / f"{n}.safetensors").info["seconds"] for n in ("p17", "p33")]
    assert result["patch_sizes"] == [17, 33]
    assert result["from"] == {"p17": str(fits / "p17.safetensors"),
                              "p33": str(fits / "p33.safetensors")}
    merged = load_artifact(fits / "merged.safetensors", kind="model")
    joint = load_artifact(fits / "both.safetensors", kind="model")
    assert sorted(merged.tensors) == sorted(joint.tensors)
    for name, tensor in joint.tensors.items():  # every scale depends on its own seed only
        assert torch.equal(merged.tensors[name], tensor), name
    assert merged.config["students"]["patch_sizes"] == [17, 33]
    assert list(merged.info["students"]["scales"]) == ["p17", "p33"]
    assert [m["patch_sizes"] for m in merged.info["merged_from"]] == [[33], [17]]
    assert merged.info["students"]["precision"] == joint.info["students"]["precision"]
    assert merged.info["merged_from"][0]["precision"] == joint.info["students"]["precision"]
    assert "calibration" not in merged.info
    assert merged.info["seconds"] == pytest.approx(sum(seconds), abs=0.1)  # fitting time, summed


def test_a_merged_model_calibrates_and_scores(fits: Path) -> None:
    out = fits / "scored.safetensors"
    stad.merge_models([fits / "p17.safetensors", fits / "p33.safetensors"], out=out)
    with pytest.raises(UsageError, match="not calibrated|calibrate"):
        stad.load_model(out, device="cpu").score(next((fits / "data").rglob("test/*/*.png")))
    stad.calibrate(out)
    model = stad.load_model(out, device="cpu")
    result = model.score(next((fits / "data").rglob("test/*/*.png")))
    assert model.patch_sizes == [17, 33] and set(result.maps) == {"p17", "p33"}
    assert result.map.shape == result.maps["p33"].shape and result.anomalous is not None


def test_calibration_is_left_out(fits: Path, tmp_path: Path) -> None:
    calibrated = tmp_path / "p17-calibrated.safetensors"
    calibrated.write_bytes((fits / "p17.safetensors").read_bytes())
    stad.calibrate(calibrated)
    assert "calib.p17" in load_artifact(calibrated).tensors
    stad.merge_models([calibrated, fits / "p33.safetensors"], out=tmp_path / "m.safetensors")
    merged = load_artifact(tmp_path / "m.safetensors")
    assert not any(name.startswith("calib") for name in merged.tensors)
    assert "calibration" not in merged.info


def test_a_scale_given_twice_is_refused(fits: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    with pytest.raises(UsageError, match=r"p17 is in both .*p17\.safetensors and .*both"):
        stad.merge_models([fits / "p17.safetensors", fits / "both.safetensors"], out=out)
    assert not out.exists()


def _changed(src: Path, dst: Path, change: Callable[[Artifact], None]) -> Path:
    artifact = load_artifact(src)
    change(artifact)
    save_artifact(dst, artifact)
    return dst


@pytest.mark.parametrize(("what", "change"), [
    ("seed = 7", lambda a: setattr(a, "seed", 7)),
    ("data.category = 'other'", lambda a: a.info["data"].update(category="other")),
    ("data.validation.images", lambda a: a.info["data"]["validation"].update(images=[])),
    ("data.n_fit = 5", lambda a: a.info["data"].update(n_fit=5)),
    ("students.lr = (not set)", lambda a: a.config["students"].pop("lr")),
    ("preprocessing.mean", lambda a: a.preprocessing.update(mean=[0.5, 0.5, 0.5])),
    ("teacher.kind = 'model'", lambda a: a.info["teacher"].update(kind="model")),
])
def test_models_of_other_runs_are_refused(fits: Path, tmp_path: Path, what: str,
                                          change: Callable[[Artifact], None]) -> None:
    other = _changed(fits / "p33.safetensors", tmp_path / "other.safetensors", change)
    out = tmp_path / "new" / "m.safetensors"
    with pytest.raises(UsageError, match=r"other\.safetensors was fitted with "
                       + re.escape(what) + r".* and .*p17"):
        stad.merge_models([fits / "p17.safetensors", other], out=out)
    assert not out.parent.exists()  # nothing written, not even the folder


def test_the_data_root_may_differ(fits: Path, tmp_path: Path) -> None:
    moved = _changed(fits / "p33.safetensors", tmp_path / "moved.safetensors",
                     lambda a: a.info["data"].update(root="/elsewhere"))
    result = stad.merge_models([fits / "p17.safetensors", moved], out=tmp_path / "m.safetensors")
    assert result["patch_sizes"] == [17, 33]


def test_teachers_that_differ_only_in_their_timings_may_merge(fits: Path, tmp_path: Path
                                                             ) -> None:
    # bit-identical teachers pretrained in two runs took different seconds
    # in other folders: their roots and the backbone's path are where each run took place
    retimed = _changed(fits / "p33.safetensors", tmp_path / "retimed.safetensors",
                       lambda a: a.info["teacher"].update(info={"losses": {"p17": {
                           "seconds": 0.281}}, "seconds": 1.5, "data": {"root": "/a/data"},
                           "backbone": {"path": "/a/w.pth", "sha256": "0" * 64}}))
    base = _changed(fits / "p17.safetensors", tmp_path / "base.safetensors",
                    lambda a: a.info["teacher"].update(info={"losses": {"p17": {
                        "seconds": 0.405}}, "seconds": 2.5, "data": {"root": "/b/data"},
                        "backbone": {"path": "/b/w.pth", "sha256": "0" * 64}}))
    result = stad.merge_models([base, retimed], out=tmp_path / "m.safetensors")
    assert result["patch_sizes"] == [17, 33]
    # other backbone weights are another teacher
    other = _changed(retimed, tmp_path / "other.safetensors", lambda a: a.info["teacher"][
        "info"]["backbone"].update(sha256="1" * 64))
    with pytest.raises(UsageError, match="sha256"):
        stad.merge_models([base, other], out=tmp_path / "m2.safetensors")


@pytest.mark.parametrize("change", [
    lambda a: a.info.update(data="x"),
    lambda a: a.info.update(students="x"),
    lambda a: a.info.update(teacher=[1]),
    lambda a: a.preprocessing.pop("image_size"),
])
def test_malformed_metadata_is_an_artifact_error(fits: Path, tmp_path: Path,
                                                 change: Callable[[Artifact], None]) -> None:
    bad = _changed(fits / "p33.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(ArtifactError, match=r"bad\.safetensors"):
        stad.merge_models([fits / "p17.safetensors", bad], out=tmp_path / "m.safetensors")


def test_one_model_or_a_teacher_is_refused(fits: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="at least two models"):
        stad.merge_models([fits / "p17.safetensors"], out=tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="a list of model files, not one"):
        stad.merge_models(str(fits / "p17.safetensors"), out=tmp_path / "m.safetensors")
    teacher = tmp_path / "teacher.safetensors"
    model = load_artifact(fits / "p33.safetensors")
    model.kind = "teacher"
    save_artifact(teacher, model)
    with pytest.raises(ArtifactError, match="teacher artifact, but this needs a model"):
        stad.merge_models([fits / "p17.safetensors", teacher], out=tmp_path / "m.safetensors")


def test_cli_merges_and_exits_2_on_a_repeated_scale(fits: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.safetensors"
    ok = runner.invoke(app, ["merge-models", str(fits / "p17.safetensors"),
                             str(fits / "p33.safetensors"), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert (f"model written to {out} (p17, p33 at 32²); next: stad calibrate --model {out}"
            in ok.output)
    bad = runner.invoke(app, ["merge-models", str(fits / "p17.safetensors"),
                              str(fits / "both.safetensors"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "p17 is in both" in bad.output
    missing = runner.invoke(app, ["merge-models", str(fits / "p17.safetensors"),
                                  str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 4 and "does not exist" in missing.output

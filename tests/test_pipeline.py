"""The commands end to end, as a user runs them, on a tiny synthetic category."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from stad.artifacts import load_artifact
from stad.cli import app
from stad.datasets.synthetic import generate
from stad.errors import EXIT_ANOMALY, EXIT_BROKEN_PIPE, EXIT_SKIPPED, EXIT_USAGE

runner = CliRunner()

# Small enough for seconds on a 2-core CPU; the flags are the documented ones.
DATA = ["--dataset", "synthetic", "--category", "grain"]
TEACHER_ENV = {"STAD_TEACHER__IMAGE_SIZE": "32", "STAD_TEACHER__BATCH_SIZE": "8"}


def run(args: list[str], env: dict[str, str] | None = None, code: int = 0) -> str:
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == code, (args, result.exit_code, result.output, result.exception)
    return result.stdout


def jsonl(text: str) -> list[dict]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all(r["schema_version"] == 1 for r in records)
    return records


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Data and a calibrated model, made once for this module (tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    tiny_data = tmp_path / "data"
    generate(tiny_data, categories=["grain"], image_size=32, n_train=6, n_val=2,
             n_test_good=2, n_test_per_defect=1, seed=1)
    teacher = tmp_path / "teacher.safetensors"
    out = run(["pretrain-teacher", *DATA, "--root", str(tiny_data), "--patch-sizes", "17",
               "--iterations", "3", "--target-whiten", "8", "--out", str(teacher), "--json"],
              env=TEACHER_ENV)
    pretrained = jsonl(out)[0]
    assert pretrained["kind"] == "teacher" and pretrained["target"] == "handcrafted"
    assert pretrained["handcrafted"]["whiten"] == 8
    # which images: counted and hashed, the root absolute (found again from any folder)
    assert pretrained["data"]["images"]["count"] == 6
    assert len(pretrained["data"]["images"]["sha256"]) == 64
    assert Path(pretrained["data"]["root"]).is_absolute()
    path = tmp_path / "model.safetensors"
    out = run(["fit-students", *DATA, "--root", str(tiny_data), "--teacher", str(teacher),
               "--patch-sizes", "17", "--epochs", "1", "--image-size", "32", "--students", "2",
               "--preset", "fast", "--out", str(path), "--json"])
    fitted = jsonl(out)[0]
    assert fitted["patch_sizes"] == [17] and fitted["n_fit"] == 6 and fitted["n_validation"] == 2
    out = run(["calibrate", "--model", str(path), "--json"])
    calibration = jsonl(out)[0]
    assert calibration["method"] == "fpr" and calibration["n_images"] == 2
    assert calibration["images_source"] == "adapter val split"
    return tiny_data, path


@pytest.fixture
def model(fitted: tuple[Path, Path]) -> Path:
    return fitted[1]


@pytest.fixture
def tiny_data(fitted: tuple[Path, Path]) -> Path:
    return fitted[0]


def test_fit_students_min_steps_flag_adds_epochs(tiny_data: Path, tmp_path: Path):
    # 6 training images at the fast preset's batch of 4: 2 steps an epoch, so --min-steps 5
    # turns --epochs 1 into 3 epochs; without the flag, --epochs 1 is exactly one.
    def epochs(*extra: str) -> int:
        out = tmp_path / f"model{len(extra)}.safetensors"
        run(["fit-students", *DATA, "--root", str(tiny_data), "--teacher", "random",
             "--patch-sizes", "17", "--epochs", "1", "--image-size", "24", "--students", "2",
             "--preset", "fast", *extra, "--out", str(out), "--json"])
        return load_artifact(out, kind="model").info["students"]["scales"]["p17"]["epochs"]

    assert epochs("--min-steps", "5") == 3
    assert epochs() == 1


def test_artifacts_load_with_safetensors_alone(model: Path):
    for path, kind in ((model.parent / "teacher.safetensors", "teacher"), (model, "model")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
        assert meta["stad.kind"] == kind
        for key in ("stad.format_version", "stad.version", "stad.config", "stad.preprocessing",
                    "stad.seed", "stad.info", "stad.digest"):
            assert key in meta
        assert json.loads(meta["stad.config"])["seed"] == 0
        assert json.loads(meta["stad.preprocessing"])["image_size"] == 32
        assert any(k.startswith("teacher.p17.") for k in keys)
    with safe_open(str(model), framework="pt") as f:
        keys = list(f.keys())
        info = json.loads(f.metadata()["stad.info"])
    assert {"norm.p17.mean", "norm.p17.std", "calib.p17"} <= set(keys)
    assert any(k.startswith("student.p17.1.") for k in keys)
    assert info["calibration"]["threshold"] == pytest.approx(info["calibration"]["threshold"])
    assert info["teacher"]["source"].endswith("teacher.safetensors")


def test_score_json_maps_and_exit_codes(model: Path, tiny_data: Path, tmp_path: Path):
    test_dir = tiny_data / "grain" / "test"
    maps = tmp_path / "maps"
    out = run(["score", "--model", str(model), "--json", "--maps", str(maps), str(test_dir)])
    records = jsonl(out)
    assert len(records) == 6
    for r in records:
        assert set(r) >= {"path", "score", "threshold", "anomalous", "scales", "map"}
        assert isinstance(r["score"], float) and set(r["scales"]) == {"p17"}
        assert Path(r["map"]).is_file()
        raw = np.asarray(Image.open(r["map"]))
        assert raw.dtype == np.float32 and raw.shape == (32, 32)
    assert len(list(maps.glob("*_overlay.png"))) == 6
    one = str(test_dir / "good" / "000.png")
    run(["score", "--model", str(model), "--threshold", "-1e9", "--fail-on-anomaly", one],
        code=EXIT_ANOMALY)
    out = run(["score", "--model", str(model), "--threshold", "1e9", "--fail-on-anomaly", one])
    assert out.strip().endswith("ok")


def test_score_other_sizes_and_grayscale(model: Path, tiny_data: Path, tmp_path: Path):
    src = Image.open(tiny_data / "grain" / "test" / "good" / "000.png")
    big = tmp_path / "big.png"
    src.resize((50, 41)).save(big)
    gray = tmp_path / "gray.png"
    src.convert("L").save(gray)
    maps = tmp_path / "maps"
    records = jsonl(run(["score", "--model", str(model), "--json", "--maps", str(maps),
                         str(big), str(gray)]))
    assert np.asarray(Image.open(records[0]["map"])).shape == (41, 50)
    assert np.isfinite(records[1]["score"])


def test_score_skips_unreadable_files_when_asked(model: Path, tiny_data: Path, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(tiny_data / "grain" / "train" / "good" / "000.png").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"")
    result = runner.invoke(app, ["score", "--model", str(model), "--json", str(folder)])
    assert result.exit_code == 3 and "b.png" in result.stderr
    result = runner.invoke(app, ["score", "--model", str(model), "--json", "--on-error", "skip",
                                 str(folder)])
    assert result.exit_code == EXIT_SKIPPED
    records = jsonl(result.stdout)
    assert [Path(r["path"]).name for r in records] == ["a.png", "b.png"]
    assert "error" in records[1] and "b.png" in result.stderr


def test_evaluate_report(model: Path, tmp_path: Path):
    report = tmp_path / "report"
    result = jsonl(run(["evaluate", "--model", str(model), "--json", "--report", str(report)]))[0]
    fused = result["maps"]["fused"]
    for key in ("au_pro", "pixel_auroc", "image_auroc", "image_ap", "pixel_ap"):
        assert 0.0 <= fused[key] <= 1.0
    assert set(result["maps"]) == {"p17", "fused"}
    assert set(fused["defects"]) == {"hole", "paste", "scratch", "stain"}
    for name in ("metrics.json", "report.html", "report.md", "examples.png"):
        assert (report / name).is_file()
    page = (report / "report.html").read_text()
    assert "<h2>Training</h2>" in page and "students: loss per epoch" in page  # from the model
    assert json.loads((report / "metrics.json").read_text())["maps"]["fused"]["au_pro"] == \
        pytest.approx(fused["au_pro"])
    text = run(["evaluate", "--model", str(model)])
    assert "AU-PRO@0.3" in text and "fused" in text


def test_calibrate_per_position_and_back(model: Path, tiny_data: Path, tmp_path: Path):
    with safe_open(str(model), framework="pt") as f:  # the default calibration
        assert tuple(f.get_tensor("calib_map.p17").shape) == (4, 32, 32)
        assert json.loads(f.metadata()["stad.info"])["calibration"]["normalize"] == "position"
    plain = tmp_path / "global.safetensors"
    result = jsonl(run(["calibrate", "--model", str(model), "--normalize", "global",
                        "--smooth-sigma", "0", "--out", str(plain), "--json"]))[0]
    assert result["normalize"] == "global" and result["smooth_sigma"] == 0
    with safe_open(str(plain), framework="pt") as f:
        assert "calib_map.p17" not in f.keys() and "calib.p17" in f.keys()
    with safe_open(str(model), framework="pt") as f:
        assert "calib_map.p17" in f.keys()  # --out left the model alone
    test_dir = tiny_data / "grain" / "test"

    def scores(path: Path) -> dict[str, float]:
        return {r["path"]: r["score"]
                for r in jsonl(run(["score", "--model", str(path), "--json", str(test_dir)]))}

    by_position, by_scale = scores(model), scores(plain)
    assert by_position.keys() == by_scale.keys()
    assert any(abs(by_position[k] - by_scale[k]) > 1e-3 for k in by_scale)
    # Calibrating the global one per position (and smoothed) again gives the default model's
    # maps: "auto" is the image size / 64, here 32 / 64.
    text = run(["calibrate", "--model", str(plain), "--normalize", "position",
                "--smooth-sigma", "auto"])
    assert ("(position normalization, smoothing σ 0.5, error only, image score: top 1 % mean)"
            in text)
    with safe_open(str(plain), framework="pt") as f:
        assert "calib_map.p17" in f.keys()
    assert scores(plain) == pytest.approx(by_position, abs=1e-5)


def test_calibrate_with_views_averaged(model: Path, tiny_data: Path, tmp_path: Path):
    viewed = tmp_path / "viewed.safetensors"
    text = run(["calibrate", "--model", str(model), "--tta", "flips", "--out", str(viewed)])
    assert ", flips views averaged, image score: top 1 % mean)" in text
    image = str(tiny_data / "grain" / "test" / "good" / "000.png")
    records = [jsonl(run(["score", "--model", str(m), "--json", image]))[0]
               for m in (model, viewed)]
    assert abs(records[0]["score"] - records[1]["score"]) > 1e-4
    with safe_open(str(viewed), framework="pt") as f:
        assert json.loads(f.metadata()["stad.info"])["calibration"]["tta"] == "flips"


def test_calibrate_replaces_damaged_statistics(model: Path, tmp_path: Path):
    from stad.artifacts import load_artifact, save_artifact

    artifact = load_artifact(model, kind="model")
    artifact.tensors["calib.p17"] = torch.full((4,), float("nan"))
    damaged = tmp_path / "damaged.safetensors"
    save_artifact(damaged, artifact)
    result = runner.invoke(app, ["score", "--model", str(damaged), str(model)])
    assert result.exit_code == 4 and "calib.p17" in result.stderr
    run(["calibrate", "--model", str(damaged), "--normalize", "position"])
    run(["score", "--model", str(damaged), "--threshold", "1e9",
         str(model.parent / "data" / "grain" / "test" / "good" / "000.png")])


@pytest.mark.parametrize("option, value", [("--normalize", "pixel"),
                                           ("--smooth-sigma", "-1"), ("--smooth-sigma", "nan"),
                                           ("--variance-weight", "2"),
                                           ("--variance-weight", "-0.1"),
                                           ("--tta", "rot45")])
def test_bad_calibrate_options_are_usage_errors(model: Path, tmp_path: Path, option: str,
                                                value: str):
    result = runner.invoke(app, ["calibrate", "--model", str(model), option, value,
                                 "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == EXIT_USAGE and option.lstrip("-").replace("-", "_") in \
        result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_uncalibrated_model_is_refused(tiny_data: Path, tmp_path: Path):
    # (tiny_data is shared and only read: fit-students writes to tmp_path)
    path = tmp_path / "m.safetensors"
    run(["fit-students", *DATA, "--root", str(tiny_data), "--teacher", "random",
         "--patch-sizes", "17", "--epochs", "1", "--image-size", "24", "--students", "2",
         "--out", str(path)])
    result = runner.invoke(app, ["score", "--model", str(path), str(tiny_data)])
    assert result.exit_code == 2 and "stad calibrate" in result.stderr


def test_teacher_given_where_a_model_is_expected(model: Path, tiny_data: Path):
    result = runner.invoke(app, ["score", "--model", str(model.parent / "teacher.safetensors"),
                                 str(tiny_data)])
    assert result.exit_code == 4 and "teacher artifact" in result.stderr


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_score_every_input_exactly_once(model: Path, tiny_data: Path, n: int):
    test_dir = tiny_data / "grain" / "test"
    everything = sorted(r["path"] for r in jsonl(run(["score", "--model", str(model), "--json",
                                                      str(test_dir)])))
    # A shard may be empty (json.loads per line: jsonl() insists on at least one record).
    shards = [sorted(json.loads(line)["path"] for line in run(
                  ["score", "--model", str(model), "--json", "--shard", f"{k}/{n}",
                   str(test_dir)]).splitlines()) for k in range(n)]
    assert sorted(p for shard in shards for p in shard) == everything
    # The split is not degenerate. Checked on fixed names: the six paths above lie under
    # pytest's numbered temporary folder, and all six hash to one of two shards once in 32.
    from stad.scorefiles import in_shard

    names = [Path(f"line/{i:03d}.png") for i in range(60)]
    sizes = [sum(in_shard(name, (k, n)) for name in names) for k in range(n)]
    assert sum(sizes) == len(names) and (n == 1 or max(sizes) < len(names) * 0.7), sizes


def test_in_shard_does_not_depend_on_listing_order() -> None:
    from stad.scorefiles import in_shard

    paths = [Path(f"/lines/cam{i % 7}/{i:06d}.png") for i in range(2000)]
    counts = [sum(in_shard(p, (k, 4)) for p in paths) for k in range(4)]
    assert sum(counts) == 2000 and min(counts) > 400  # disjoint, covering, balanced
    assert [in_shard(p, (1, 4)) for p in reversed(paths)] == \
        [in_shard(p, (1, 4)) for p in paths][::-1]


def test_map_names_are_short_where_they_can_be_and_never_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stad.scorefiles import map_names

    a = Path("/data/bottle/test/good/000.png")
    b = Path("/data/cable/test/good/000.png")
    c = Path("/data/bottle/test/good/000.jpg")
    d = Path("/data/bottle/test/crack/001.png")
    assert map_names([a, d]) == {a: "test__good__000", d: "test__crack__001"}
    assert map_names([Path("part.png")]) == {Path("part.png"): "part"}  # the path as given
    assert map_names([a, b, d]) == {a: "bottle__test__good__000",
                                    b: "cable__test__good__000", d: "test__crack__001"}
    assert map_names([a, c]) == {a: "test__good__000.png", c: "test__good__000.jpg"}
    # the same file named twice, two ways: one name, its maps written once
    monkeypatch.chdir(tmp_path)
    assert len(set(map_names([Path("x.png"), tmp_path / "x.png"]).values())) == 1
    # names that only a hash tells apart: "x__a" as one folder and as two
    e, f = Path("/r/x/a__b/c.png"), Path("/r/x__a/b/c.png")
    named = map_names([e, f])
    assert len(set(named.values())) == 2 and all("-" in n for n in named.values())


def test_map_names_of_long_file_names_are_cut_and_stay_apart(tmp_path: Path) -> None:
    from stad.scorefiles import map_names, write_maps

    # legal names (250 bytes) that the maps' suffixes would take past 255 bytes; two that
    # differ only at their end, one of Japanese characters, one whose bytes are not UTF-8
    a, b = Path("in") / ("a" * 246 + "1.png"), Path("in") / ("a" * 246 + "2.png")
    c = Path("in") / ("検" * 82 + ".png")
    d, e = Path("x") / os.fsdecode(b"\xff.png"), Path("y") / os.fsdecode(b"\xff.png")
    named = map_names([a, b, c, d, e])
    assert len(set(named.values())) == 5
    assert all(len(os.fsencode(n)) <= 255 - len("_overlay.png") for n in named.values())
    assert named[a].startswith("in__aaaa") and named[c].startswith("in__検")
    amap = np.zeros((4, 6), np.float32)
    for path in (a, b, c):  # written where the file system allows 255 bytes a name
        write_maps(tmp_path, named[path], amap, np.zeros((4, 6, 3), np.float32), 1.0,
                   mask=amap > 0)
    assert len(list(tmp_path.iterdir())) == 3 * 4


@pytest.mark.parametrize("shard", ["1", "2/2", "-1/3", "a/b", "1/0"])
def test_bad_shard_is_a_usage_error(model: Path, tiny_data: Path, shard: str):
    out = run(["score", "--model", str(model), "--shard", shard,
               str(tiny_data / "grain" / "test")], code=EXIT_USAGE)
    assert out == ""


def test_output_file_and_skip_existing_resume_an_interrupted_run(
        model: Path, tiny_data: Path, tmp_path: Path):
    test_dir = tiny_data / "grain" / "test"
    log = tmp_path / "scores.jsonl"
    run(["score", "--model", str(model), "--output", str(log), str(test_dir)])
    full = jsonl(log.read_text())
    assert len(full) == 6 and all("score" in r for r in full)
    # An interrupted run: three records and half of a fourth line.
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][:20])
    out = run(["score", "--model", str(model), "--json", "--output", str(log),
               "--skip-existing", str(test_dir)])
    assert len(jsonl(out)) == 3  # only what was missing is scored again
    again = jsonl(log.read_text())
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in full)
    by_path = {r["path"]: r["score"] for r in full}
    assert all(by_path[r["path"]] == pytest.approx(r["score"]) for r in again)
    # Without --skip-existing the file starts afresh; --skip-existing needs --output.
    run(["score", "--model", str(model), "--output", str(log), str(test_dir / "good")])
    assert len(jsonl(log.read_text())) == len(list((test_dir / "good").glob("*.png")))
    run(["score", "--model", str(model), "--skip-existing", str(test_dir)], code=EXIT_USAGE)


def test_a_resumed_run_gates_on_the_verdicts_recorded_before(
        model: Path, tiny_data: Path, tmp_path: Path):
    test_dir = tiny_data / "grain" / "test"
    log = tmp_path / "scores.jsonl"
    every = ["--model", str(model), "--output", str(log), "--fail-on-anomaly",
             "--threshold", "1e9"]
    # A first try cancelled after three records, each of them anomalous ...
    run(["score", *every, str(test_dir)])
    first = [{**r, "anomalous": True} for r in jsonl(log.read_text())[:3]]
    log.write_text("".join(json.dumps(r) + "\n" for r in first))
    # ... and its retry, where no image it scores is anomalous: the gate still fails.
    result = runner.invoke(app, ["score", *every, "--skip-existing", str(test_dir)])
    assert result.exit_code == EXIT_ANOMALY, result.output
    assert "3 inputs already recorded" in result.stderr and "3 of them anomalous" in result.stderr
    assert len(jsonl(log.read_text())) == 6
    # A record of another input in the file does not count.
    log.write_text(json.dumps({"path": "elsewhere.png", "anomalous": True}) + "\n")
    run(["score", *every, "--skip-existing", str(test_dir)])


def test_a_resume_names_its_inputs_as_before_and_keeps_their_threshold(
        model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tiny_data / "grain")
    log = tmp_path / "scores.jsonl"
    run(["score", "--model", str(model), "--output", str(log), "test"])  # relative paths
    recorded = log.read_text()
    # A retry at another threshold would mix two thresholds' verdicts in one file: refused,
    # the file left as it was.
    result = runner.invoke(app, ["score", "--model", str(model), "--output", str(log),
                                 "--skip-existing", "--threshold", "1e9", "test"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "judged at threshold" in result.stderr and "1000000000.0" in result.stderr
    assert log.read_text() == recorded
    # Records go by the path as given (as shards do): other names are new inputs, and the run
    # says that none of the records matched.
    result = runner.invoke(app, ["score", "--model", str(model), "--output", str(log),
                                 "--skip-existing", str(tiny_data / "grain" / "test")])
    assert result.exit_code == 0, result.output
    assert "none of the 6 records" in result.stderr
    assert len(jsonl(log.read_text())) == 12


def test_output_naming_an_input_image_is_refused(model: Path, tiny_data: Path,
                                                 tmp_path: Path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    image.write_bytes(next((tiny_data / "grain" / "test" / "good").glob("*.png")).read_bytes())
    before = image.read_bytes()
    for given in (image, image.parent):  # named, or found in a folder
        result = runner.invoke(app, ["score", "--model", str(model), "--output", str(image),
                                     str(given)])
        assert result.exit_code == EXIT_USAGE and "one of the images" in result.output
    # the same file under other names: a symbolic link as --output, a hard link as input
    (tmp_path / "out.jsonl").symlink_to(image)
    os.link(image, tmp_path / "in" / "b.png")
    for output, given in ((tmp_path / "out.jsonl", image),
                          (image, tmp_path / "in" / "b.png")):
        result = runner.invoke(app, ["score", "--model", str(model), "--output", str(output),
                                     str(given)])
        assert result.exit_code == EXIT_USAGE and "one of the images" in result.output
    assert image.read_bytes() == before


def test_a_closed_pipe_stops_score_quietly(model: Path, tiny_data: Path):
    # `stad score ... | head -1`: the reader goes after one line; stad stops with 141 (as a
    # program killed by SIGPIPE) and no error message, not as a bug.
    inputs = [str(tiny_data / "grain" / "test")] * 40  # 240 records: more than a pipe holds
    with subprocess.Popen([sys.executable, "-m", "stad", "score", "--model", str(model),
                           "--json", *inputs], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["schema_version"] == 1
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == EXIT_BROKEN_PIPE, err
    assert "error" not in err and "Broken pipe" not in err, err


def test_a_name_that_is_not_utf8_round_trips_through_the_records(
        model: Path, tiny_data: Path, tmp_path: Path):
    # Python keeps such bytes as lone surrogates; the record's JSON escapes them (\udcff), and
    # Python's json (and --skip-existing) read back the very file name
    odd = tmp_path / os.fsdecode(b"bad\xff.png")
    odd.write_bytes(next((tiny_data / "grain" / "test" / "good").glob("*.png")).read_bytes())
    log = tmp_path / "scores.jsonl"
    out = run(["score", "--model", str(model), "--json", "--output", str(log), str(odd)])
    assert "\\udcff" in log.read_text() and Path(jsonl(out)[0]["path"]) == odd
    again = run(["score", "--model", str(model), "--json", "--output", str(log),
                 "--skip-existing", str(odd)])
    assert again == "" and len(jsonl(log.read_text())) == 1


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(
        model: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch):
    # e.g. an --output FIFO whose reader went away: a failure to report, not a quiet 141
    import stad.commands.score as command

    def broken(*args: object, **kwargs: object):
        raise BrokenPipeError(32, "Broken pipe")
        yield

    monkeypatch.setattr(command, "score", broken)
    result = runner.invoke(app, ["score", "--model", str(model), str(tiny_data)])
    assert result.exit_code == 1 and "unexpected error: BrokenPipeError" in result.output


def test_a_missing_model_says_what_to_give(tmp_path: Path, tiny_data: Path):
    result = runner.invoke(app, ["score", "--model", str(tmp_path / "none.safetensors"),
                                 str(tiny_data / "grain" / "test")])
    assert result.exit_code == 4 and "from `stad fit-students`" in result.output
    # a name too long to look up is still the artifact's one-line error, not a crash
    result = runner.invoke(app, ["score", "--model", str(tmp_path / ("a" * 300)),
                                 str(tiny_data / "grain" / "test")])
    assert result.exit_code == 4 and "unexpected" not in result.output, result.output


def test_a_run_that_fails_to_start_leaves_the_output_alone(tiny_data: Path, tmp_path: Path):
    log = tmp_path / "scores.jsonl"
    log.write_text('{"path": "a.png", "score": 1.0}\n')
    run(["score", "--model", str(tmp_path / "missing.safetensors"), "--output", str(log),
         str(tiny_data / "grain" / "test")], code=4)
    assert log.read_text() == '{"path": "a.png", "score": 1.0}\n'


def test_outputs_that_would_go_wrong_are_refused_or_written_through(model: Path, tiny_data: Path,
                                                                    tmp_path: Path):
    # --maps naming the input folder: its pictures are never scored, and the folder was
    # reported as holding no images.
    images = shutil.copytree(tiny_data / "grain" / "test" / "good", tmp_path / "in")
    result = runner.invoke(app, ["score", "--model", str(model), "--maps", str(images),
                                 str(images)])
    assert result.exit_code == EXIT_USAGE and "is the --maps folder" in result.stderr
    # A model artifact under a .onnx name would be read as an exported model, and fail.
    for args in (["calibrate", "--model", str(model), "--out", str(tmp_path / "c.onnx")],
                 ["merge-models", str(model), str(model), "--out", str(tmp_path / "m.onnx")]):
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_USAGE and "ends in .onnx" in result.stderr, args
    assert not list(tmp_path.glob("*.onnx"))
    # Calibrating through a link updates the model it points to (it put a file in its place).
    copy = tmp_path / "v3.safetensors"
    shutil.copy(model, copy)
    (tmp_path / "current.safetensors").symlink_to(copy.name)
    run(["calibrate", "--model", str(tmp_path / "current.safetensors"), "--method", "manual",
         "--threshold", "123"])
    assert (tmp_path / "current.safetensors").is_symlink()
    image = str(next(images.glob("*.png")))
    assert jsonl(run(["score", "--model", str(copy), "--json", image]))[0]["threshold"] == 123
    # A report folder through a link to nothing: refused before the evaluation, not after it.
    (tmp_path / "rep").symlink_to(tmp_path / "nowhere")
    result = runner.invoke(app, ["evaluate", "--model", str(model), "--report",
                                 str(tmp_path / "rep")])
    assert result.exit_code == EXIT_USAGE and "is a link to nothing" in result.stderr
    # Records cannot be resumed from a FIFO (reading it would wait for a writer).
    os.mkfifo(tmp_path / "records")
    result = runner.invoke(app, ["score", "--model", str(model), "--output",
                                 str(tmp_path / "records"), "--skip-existing", image])
    assert result.exit_code == EXIT_USAGE and "not a regular file" in result.stderr
    # A missing teacher is named as the option it came from.
    result = runner.invoke(app, ["fit-students", *DATA, "--root", str(tiny_data), "--teacher",
                                 str(tmp_path / "nope.safetensors"), "--out",
                                 str(tmp_path / "x.safetensors")])
    assert result.exit_code == 4 and "(given as --teacher, teacher=)" in result.stderr


def test_calibrating_on_one_image_warns(model: Path, tiny_data: Path, capsys):
    # Its own per-position statistics set the threshold too low: every normal image flagged.
    import stad

    images = sorted((tiny_data / "grain" / "val" / "good").glob("*.png"))
    m = stad.load_model(model)
    capsys.readouterr()
    m.calibrate(images[:1])
    assert "warning: calibrated on one normal image" in capsys.readouterr().err
    m.calibrate(images[:2])
    assert "calibrated on one" not in capsys.readouterr().err


def test_a_run_that_fails_first_leaves_no_output_folder(tmp_path: Path):
    # The output folders were made while checking them, before the model was read.
    missing = str(tmp_path / "nope.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    for args in (["evaluate", "--model", missing, "--report", str(work / "report")],
                 ["score", "--model", missing, "--maps", str(work / "maps"), missing],
                 ["calibrate", "--model", missing, "--out", str(work / "a" / "m.safetensors")],
                 ["export", "--model", missing, "--out", str(work / "c" / "m.onnx")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 4 and "nope.safetensors" in result.stderr, args
    assert list(work.iterdir()) == []

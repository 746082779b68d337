"""`stad export --format onnx` and scoring the exported graph with onnxruntime: parity with
PyTorch fp32 (maps to 1e-4 of their spread, identical verdicts and regions) on the synthetic
set and on real photos, the metadata, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import stad
from stad.cli import app
from stad.config import ScoreSettings
from stad.datasets.synthetic import generate
from stad.errors import EXIT_ARTIFACT, EXIT_DATA, EXIT_USAGE, ArtifactError, UsageError

onnx = pytest.importorskip("onnx", reason="the onnx extra is part of the test extra")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra")

STUDENTS = {"patch_sizes": [17, 33], "epochs": 1, "image_size": 48, "n_students": 2}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Synthetic data, a calibrated two-scale model (per-position statistics), its export."""
    tmp = tmp_path_factory.mktemp("export")
    generate(tmp / "data", categories=["grain"], image_size=48, n_train=6, n_val=2,
             n_test_good=2, n_test_per_defect=1, seed=2)
    model = tmp / "model.safetensors"
    stad.fit_students(model, teacher="random", dataset="synthetic", category="grain",
                      root=tmp / "data", students=STUDENTS)
    stad.calibrate(model)
    old = os.umask(0o022)
    try:
        out = CliRunner().invoke(app, ["export", "--model", str(model), "--out",
                                       str(tmp / "model.onnx"), "--json"])
    finally:
        os.umask(old)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[0])["format"] == "onnx"
    return tmp / "data", model, tmp / "model.onnx"


def _real_photos(folder: Path) -> list[Path]:
    from skimage import data

    folder.mkdir(exist_ok=True)
    paths = []
    for name in ("brick", "coffee", "gravel"):
        image = getattr(data, name)()
        path = folder / f"{name}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_the_graph_and_its_metadata(exported: tuple[Path, Path, Path]) -> None:
    _, model_path, onnx_path = exported
    assert onnx_path.stat().st_mode & 0o777 == 0o644
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    model = stad.load_model(model_path, device="cpu")
    assert json.loads(meta["stad.patch_sizes"]) == [17, 33]
    assert json.loads(meta["stad.preprocessing"])["image_size"] == 48
    calibration = json.loads(meta["stad.calibration"])
    assert calibration["threshold"] == model.threshold
    assert calibration["pixel_threshold"] == model.calibration["pixel_threshold"]
    assert calibration["variance_weight"] == model.networks.variance_weight
    assert meta["stad.stad_version"] == stad.__version__
    # The batch is dynamic: 3 images in one run.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    fused, scales = session.run(None, {"images": np.zeros((3, 3, 48, 48), np.float32)})
    assert fused.shape == (3, 48, 48) and scales.shape == (3, 2, 48, 48)


def _parity(torch_model: stad.Model, onnx_model: stad.Model, paths: list[Path]) -> None:
    for a, b in zip(torch_model.score(paths), onnx_model.score(paths), strict=True):
        spread = float(a.map.max() - a.map.min())
        assert np.abs(a.map - b.map).max() <= 1e-4 * spread
        assert a.anomalous == b.anomalous and abs(a.score - b.score) <= 1e-4 * spread
        assert [r.bbox for r in a.regions] == [r.bbox for r in b.regions]
        for k in a.maps:
            assert np.abs(a.maps[k] - b.maps[k]).max() <= 1e-4 * spread


def test_onnxruntime_matches_pytorch_on_synthetic_and_real_images(
        exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, model_path, onnx_path = exported
    torch_model = stad.load_model(model_path, device="cpu")
    onnx_model = stad.load_model(onnx_path)
    assert onnx_model.onnx and onnx_model.threshold == torch_model.threshold
    synthetic = sorted((data / "grain" / "test").rglob("*.png"))
    assert len(synthetic) >= 6
    _parity(torch_model, onnx_model, synthetic)
    _parity(torch_model, onnx_model, _real_photos(tmp_path))  # 512² and 400×600 photos


def test_the_graph_adds_the_variance_as_calibrated(exported: tuple[Path, Path, Path],
                                                   tmp_path: Path) -> None:
    # The fixture's model scores the error alone (the default); calibrated with half the
    # variance, its export must compute that too.
    data, model_path, _ = exported
    weighed = tmp_path / "weighed.safetensors"
    assert stad.calibrate(model_path, out=weighed,
                          calibrate={"variance_weight": 0.5})["variance_weight"] == 0.5
    onnx_path = tmp_path / "weighed.onnx"
    out = CliRunner().invoke(app, ["export", "--model", str(weighed), "--out", str(onnx_path)])
    assert out.exit_code == 0, out.output
    onnx_model = stad.load_model(onnx_path)
    assert onnx_model.calibration["variance_weight"] == 0.5
    images = sorted((data / "grain" / "test").rglob("*.png"))[:3]
    _parity(stad.load_model(weighed, device="cpu"), onnx_model, images)
    plain = stad.load_model(model_path, device="cpu").score(images[0]).map
    assert np.abs(onnx_model.score(images[0]).map - plain).max() > 1e-3


def test_the_graph_averages_the_views_as_calibrated(exported: tuple[Path, Path, Path],
                                                    tmp_path: Path) -> None:
    data, model_path, _ = exported
    viewed = tmp_path / "viewed.safetensors"
    assert stad.calibrate(model_path, out=viewed, calibrate={"tta": "dihedral"})["tta"] \
        == "dihedral"
    onnx_path = tmp_path / "viewed.onnx"
    out = CliRunner().invoke(app, ["export", "--model", str(viewed), "--out", str(onnx_path)])
    assert out.exit_code == 0, out.output
    onnx_model = stad.load_model(onnx_path)
    assert onnx_model.calibration["tta"] == "dihedral"
    images = sorted((data / "grain" / "test").rglob("*.png"))[:3]
    _parity(stad.load_model(viewed, device="cpu"), onnx_model, images)
    plain = stad.load_model(model_path, device="cpu").score(images[0]).map
    assert np.abs(onnx_model.score(images[0]).map - plain).max() > 1e-3


def test_an_export_without_scale_names_takes_its_patch_sizes(exported: tuple[Path, Path, Path],
                                                              tmp_path: Path) -> None:
    # Exports made before scales at other sizes hold stad.patch_sizes only.
    data, model_path, onnx_path = exported
    proto = onnx.load(str(onnx_path))
    kept = [p for p in proto.metadata_props if p.key != "stad.scales"]
    assert len(kept) == len(proto.metadata_props) - 1
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = stad.load_model(tmp_path / "old.onnx")
    assert old.scales == ["p17", "p33"] == stad.load_model(onnx_path).scales
    _parity(stad.load_model(model_path, device="cpu"), old,
            sorted((data / "grain" / "test").rglob("*.png"))[:2])


def test_score_and_evaluate_take_the_onnx_file(exported: tuple[Path, Path, Path]) -> None:
    data, model_path, onnx_path = exported
    image = str(next((data / "grain" / "test").glob("*/000.png")))
    records = []
    for path in (model_path, onnx_path):
        out = CliRunner().invoke(app, ["score", "--model", str(path), image, "--json",
                                       "--device", "cpu"])
        assert out.exit_code == 0, out.output
        records.append(json.loads(out.stdout.splitlines()[0]))
    assert records[0]["anomalous"] == records[1]["anomalous"]
    assert records[0]["score"] == pytest.approx(records[1]["score"], rel=1e-4, abs=1e-4)
    out = CliRunner().invoke(app, ["evaluate", "--model", str(onnx_path), "--json"])
    assert out.exit_code == 0, out.output
    assert 0 <= json.loads(out.stdout.splitlines()[0])["maps"]["fused"]["au_pro"] <= 1


def test_an_export_scores_images_by_the_rule_it_was_calibrated_with(
        exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # The rule travels in the metadata: an export of a model calibrated with the maximum scores
    # by the maximum, not by the default top 1 %.
    data, model_path, onnx_path = exported
    peak_model, peak_onnx = tmp_path / "max.safetensors", tmp_path / "max.onnx"
    stad.calibrate(model_path, out=peak_model, score={"image_score": "max"})
    out = CliRunner().invoke(app, ["export", "--model", str(peak_model), "--out",
                                   str(peak_onnx)])
    assert out.exit_code == 0, out.output
    metadata = {p.key: p.value for p in onnx.load(str(peak_onnx)).metadata_props}
    assert json.loads(metadata["stad.calibration"])["image_score"] == "max"
    image = next((data / "grain" / "test").glob("*/000.png"))
    scores = {}
    for path in (onnx_path, peak_onnx, peak_model):
        result = stad.load_model(path, device="cpu").score(image)
        scores[path.name] = result.score
        if path == peak_onnx:
            assert result.score == pytest.approx(float(result.map.max()), rel=1e-6)
    assert scores["max.onnx"] == pytest.approx(scores["max.safetensors"], rel=1e-4, abs=1e-4)
    assert scores["max.onnx"] > scores["model.onnx"]


def test_onnxruntime_uses_as_many_threads_as_torch(exported: tuple[Path, Path, Path]) -> None:
    # onnxruntime's own default is every core; stad gives it torch's count (OMP_NUM_THREADS,
    # torch.set_num_threads), so that one setting bounds both backends.
    _, _, onnx_path = exported
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            session = stad.load_model(onnx_path).networks.session
            assert session.get_session_options().intra_op_num_threads == threads
    finally:
        torch.set_num_threads(before)


def test_bad_exports_and_bad_onnx_files(exported: tuple[Path, Path, Path],
                                        tmp_path: Path) -> None:
    data, model_path, onnx_path = exported
    run = CliRunner().invoke
    # a teacher artifact where a model is expected
    teacher = stad.model.builtin_teacher_path()
    out = run(app, ["export", "--model", str(teacher), "--out", str(tmp_path / "t.onnx")])
    assert out.exit_code == EXIT_ARTIFACT and "teacher" in out.output
    out = run(app, ["export", "--model", str(model_path), "--format", "torchscript",
                    "--out", str(tmp_path / "m.pt")])
    assert out.exit_code == EXIT_USAGE and "deprecated" in out.output
    (tmp_path / "a-file").write_text("")
    out = run(app, ["export", "--model", str(model_path), "--out",
                    str(tmp_path / "a-file" / "m.onnx")])  # under a file: cannot be written
    assert out.exit_code == EXIT_USAGE and "a-file" in out.output
    (tmp_path / "folder.onnx").mkdir()
    out = run(app, ["export", "--model", str(model_path), "--out", str(tmp_path / "folder.onnx")])
    assert out.exit_code == EXIT_USAGE and "is a folder" in out.output
    # an uncalibrated model
    raw = tmp_path / "raw.safetensors"
    stad.fit_students(raw, teacher="random", dataset="synthetic", category="grain", root=data,
                      students={**STUDENTS, "patch_sizes": [17]})
    with pytest.raises(UsageError, match="not calibrated"):
        stad.load_model(raw, device="cpu").export(tmp_path / "raw.onnx")
    # a truncated ONNX file, and an exported one asked to calibrate
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="cut.onnx"):
        stad.load_model(cut)
    # a stad model renamed .onnx (it said "Wire format was corrupt")
    renamed = tmp_path / "renamed.onnx"
    shutil.copy(model_path, renamed)
    out = run(app, ["score", "--model", str(renamed), str(onnx_path)])
    assert out.exit_code == EXIT_ARTIFACT and "rename it to .safetensors" in out.output
    # a missing .onnx model is a missing artifact (exit 4), as a missing .safetensors one is
    out = run(app, ["score", "--model", str(tmp_path / "gone.onnx"), str(onnx_path)])
    assert out.exit_code == EXIT_ARTIFACT and "gone.onnx" in out.output
    with pytest.raises(UsageError, match="cannot be calibrated"):
        stad.load_model(onnx_path).calibrate([])
    copy = tmp_path / "model.onnx"
    shutil.copy(onnx_path, copy)
    out = run(app, ["calibrate", "--model", str(copy)])
    assert out.exit_code == EXIT_USAGE and "ONNX" in out.output


def test_options_an_onnx_model_cannot_honour_are_refused(exported: tuple[Path, Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    data, model_path, onnx_path = exported
    image = str(next((data / "grain" / "test" / "good").glob("*.png")))
    run = CliRunner().invoke
    # onnxruntime scores on the CPU, in float32, whole images: said, not silently ignored
    for flags, words in ((["--device", "cuda"], "device cuda"),
                         (["--precision", "bf16"], "precision bf16"),
                         (["--tile-size", "64"], None)):
        out = run(app, ["score", "--model", str(onnx_path), *flags, image])
        if words is None:  # 64 is not below the model's 48²: nothing would be tiled
            assert out.exit_code == 0, out.output
        else:
            assert out.exit_code == EXIT_USAGE and words in out.output, out.output
    with pytest.raises(UsageError, match="tile size 32"):
        stad.Model.load(onnx_path, score=ScoreSettings.model_construct(
            **{**ScoreSettings().model_dump(), "tile_size": 32}))
    # a tile size no one set (the default's 512 below a larger model) is not refused: tiles
    # are exact, whole images give the same maps
    assert stad.Model.load(onnx_path, score=ScoreSettings.model_construct(
        _fields_set=set(), **{**ScoreSettings().model_dump(), "tile_size": 32})).onnx
    assert run(app, ["score", "--model", str(onnx_path), "--device", "cpu", image]
               ).exit_code == 0
    # without onnx, export stops before it makes the folder of --out
    monkeypatch.setitem(sys.modules, "onnx", None)
    out = run(app, ["export", "--model", str(model_path), "--out",
                    str(tmp_path / "new" / "m.onnx")])
    assert out.exit_code == EXIT_USAGE and "pip install" in out.output
    assert not (tmp_path / "new").exists()


def test_the_onnx_speed_benchmark_runs(exported: tuple[Path, Path, Path]) -> None:
    import subprocess
    import sys

    data, model_path, _ = exported
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "benchmarks" / "onnx_speed.py"),
                             "--model", str(model_path), "--images",
                             str(data / "grain" / "test" / "good"), "--rounds", "1",
                             "--threads", "1", "--backends", "torch-fp32,onnx-fp32,onnx-int8"],
                            capture_output=True, text=True, timeout=600, check=True, cwd=repo)
    figures = json.loads(result.stdout)
    backends = figures["backends"]
    assert figures["images"] == 2 and set(backends) == {"torch-fp32", "onnx-fp32", "onnx-int8"}
    assert all(b["images_per_s"] > 0 for b in backends.values())
    assert backends["torch-fp32"]["max_map_difference_of_spread"] == 0
    assert backends["onnx-fp32"]["verdicts_identical"] is True
    assert backends["onnx-fp32"]["max_map_difference_of_spread"] < 1e-4
    assert 0 < backends["onnx-int8"]["max_map_difference_of_spread"] < 1
    assert backends["onnx-int8"]["bytes"] < backends["onnx-fp32"]["bytes"] / 2


def test_export_checks_its_output_before_reading_the_model(
        exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, model_path, _ = exported
    run = CliRunner().invoke
    out = run(app, ["export", "--model", str(model_path), "--out", str(tmp_path / "m.bin")])
    assert out.exit_code == EXIT_USAGE and ".onnx" in out.output
    same = tmp_path / "same.onnx"
    out = run(app, ["export", "--model", str(same), "--out", str(same)])
    assert out.exit_code == EXIT_USAGE and "the --model file itself" in out.output


def test_int8_export_is_calibrated_on_the_held_back_images(
        exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, model_path, _ = exported
    out = CliRunner().invoke(app, ["export", "--model", str(model_path), "--out",
                                   str(tmp_path / "m8.onnx"), "--quantize", "int8", "--json"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout.splitlines()[0])
    quantization = record["quantization"]
    assert quantization["type"] == "int8" and quantization["calibration_images"] == 2  # n_val
    proto = onnx.load(str(tmp_path / "m8.onnx"))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["stad.quantization"]) == quantization
    assert json.loads(meta["stad.patch_sizes"]) == [17, 33]
    # every convolution reads int8 weights
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    int8 = [n for n in convs if n.input[1] in producer
            and producer[n.input[1]].op_type == "DequantizeLinear"]
    weights = {i.name: i for i in proto.graph.initializer}
    assert int8 and all(weights[producer[n.input[1]].input[0]].data_type
                        == onnx.TensorProto.INT8 for n in int8)
    # ... but each network's last one (the descriptor), which stays fp32: 2 scales of a
    # teacher and 2 students, 4 convolutions each at p = 17, 4 at p = 33.
    fp32 = [n for n in convs if n not in int8]
    assert len(fp32) == 6 and len(int8) == len(convs) - 6
    assert all(weights[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in fp32)
    assert quantization["fp32"].startswith("each network's last convolution")
    # The int8 maps stay near the fp32 ones (figures on real photos: docs/benchmarks.md).
    paths = sorted((data / "grain" / "test").rglob("*.png"))
    fp32 = stad.load_model(model_path, device="cpu").score(paths)
    int8 = stad.load_model(tmp_path / "m8.onnx").score(paths)
    for a, b in zip(fp32, int8, strict=True):
        spread = float(a.map.max() - a.map.min())
        assert 0 < np.abs(a.map - b.map).mean() <= 0.05 * spread
    a_scores = np.array([r.score for r in fp32])
    b_scores = np.array([r.score for r in int8])
    assert np.corrcoef(a_scores, b_scores)[0, 1] > 0.9


def test_int8_export_of_a_model_that_averages_views(exported: tuple[Path, Path, Path],
                                                    tmp_path: Path) -> None:
    data, model_path, _ = exported
    viewed = tmp_path / "viewed.safetensors"
    stad.calibrate(model_path, out=viewed, calibrate={"tta": "hflip"})
    out = CliRunner().invoke(app, ["export", "--model", str(viewed), "--out",
                                   str(tmp_path / "v8.onnx"), "--quantize", "int8"])
    assert out.exit_code == 0, out.output
    proto = onnx.load(str(tmp_path / "v8.onnx"))
    weights = {i.name: i for i in proto.graph.initializer}
    fp32 = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in weights
            and weights[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    assert len(fp32) == 6 * 2  # each descriptor convolution once per view
    image = sorted((data / "grain" / "test").rglob("*.png"))[0]
    a = stad.load_model(viewed, device="cpu").score(image)
    b = stad.load_model(tmp_path / "v8.onnx").score(image)
    assert np.abs(a.map - b.map).mean() <= 0.05 * float(a.map.max() - a.map.min())


def test_int8_export_refuses_bad_requests(exported: tuple[Path, Path, Path],
                                          tmp_path: Path) -> None:
    _, model_path, _ = exported
    out = CliRunner().invoke(app, ["export", "--model", str(model_path), "--out",
                                   str(tmp_path / "m.onnx"), "--quantize", "int4"])
    assert out.exit_code == EXIT_USAGE and "--quantize must be int8" in out.output
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UsageError, match="calibration images"):
        stad.load_model(model_path, device="cpu").export(tmp_path / "m.onnx", quantize="int8")
    with pytest.raises(UsageError, match="quantize='int8'"):  # images that would be unused
        stad.load_model(model_path, device="cpu").export(
            tmp_path / "m.onnx", calibration_images=[np.zeros((8, 8, 3), np.uint8)])
    assert not (tmp_path / "m.onnx").exists()
    out = CliRunner().invoke(app, ["export", "--model", str(model_path), "--out",
                                   str(tmp_path / "m.onnx"), "--quantize", "int8",
                                   "--dataset", "mvtec", "--root", str(tmp_path / "nowhere")])
    assert out.exit_code == EXIT_DATA and "nowhere" in out.output, out.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("where", ["initializer", "attribute"])
def test_an_onnx_model_reading_another_file_is_refused(exported: tuple[Path, Path, Path],
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       where: str) -> None:
    """onnxruntime reads a tensor's "external data" from a file relative to the current folder:
    a crafted model could copy that file (a .env) into its maps and scores."""
    from onnx import external_data_helper, helper

    _, _, onnx_path = exported
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_bytes(b"db_password=hunter2")
    proto = onnx.load(str(onnx_path))
    tensor = onnx.TensorProto(name="secret", data_type=onnx.TensorProto.UINT8, dims=[19],
                              raw_data=bytes(19))
    external_data_helper.set_external_data(tensor, location="secret.txt")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    if where == "initializer":
        proto.graph.initializer.append(tensor)
    else:  # a Constant node's tensor attribute, its output unused
        proto.graph.node.append(helper.make_node("Constant", [], ["unused"], value=tensor))
    crafted = tmp_path / "crafted.onnx"
    crafted.write_bytes(proto.SerializeToString())
    with pytest.raises(ArtifactError, match="keeps tensor 'secret' in another file"):
        stad.load_model(crafted)
    image = str(next((exported[0] / "grain" / "test").glob("*/000.png")))
    out = CliRunner().invoke(app, ["score", "--model", str(crafted), image])
    assert out.exit_code == EXIT_ARTIFACT and "crafted.onnx" in out.stderr


def test_an_onnx_graph_failing_while_scoring_is_an_artifact_error() -> None:
    """A crafted graph can ask onnxruntime for any memory (ConstantOfShape): exit 4 naming the
    file, not an unexpected error."""
    from stad.export import OnnxNetworks

    class Failing:
        def run(self, *args: object) -> None:
            raise RuntimeError("Fail: bad allocation of 6400000000 bytes\nmore detail")

    networks = OnnxNetworks(Failing(), {}, ["p17"], source="crafted.onnx")
    with pytest.raises(ArtifactError) as info:
        networks.maps(torch.zeros(1, 3, 32, 32))
    assert str(info.value) == ("crafted.onnx failed while scoring: Fail: bad allocation of "
                               "6400000000 bytes")

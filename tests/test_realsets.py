"""The real-image quality benchmark (benchmarks/realsets.py, benchmarks/quality.py): its sets are
deterministic, their masks exact, texture splits disjoint, and the benchmark runs."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from stad.datasets.registry import get_adapter
from stad.images import load_image, load_mask

# scikit-image's wheel holds the source photos; the `test` extra installs it (a missing one
# must fail the run, not skip these tests).
assert importlib.util.find_spec("skimage") is not None, "pip install -e '.[test]'"

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


realsets = _module("realsets")
quality = _module("quality")

TINY = realsets.Params(image_size=32, n_train=3, n_val=1, n_test_good=1, n_test_per_defect=1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_generation_is_byte_identical_per_seed(tmp_path: Path) -> None:
    for run in ("a", "b"):
        for name in ("gravel", "coffee"):
            realsets.generate_set(tmp_path / run, name, seed=3, params=TINY)
    realsets.generate_set(tmp_path / "c", "gravel", seed=4, params=TINY)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    # 3 train + 1 val + 1 good + 5 defects with 5 masks, plus the marker, per set.
    assert len(a) == 2 * (5 + 2 * len(realsets.DEFECTS) + 1) == 2 * 16 and a == b
    c = _files(tmp_path / "c")
    assert c["gravel/train/good/000.png"] != a["gravel/train/good/000.png"]  # the seed matters
    # The files are what render_sample says they are.
    sample = realsets.render_sample("coffee", seed=3, split="test", defect="warp", index=0,
                                    image_size=32)
    assert np.array_equal(np.asarray(load_image(tmp_path / "a/coffee/test/warp/000.png")),
                          sample["image"] / np.float32(255))
    written = load_mask(tmp_path / "a/coffee/ground_truth/warp/000_mask.png")
    assert np.array_equal(written, sample["mask"] > 0)


@pytest.mark.parametrize("name", ["brick", "coins", "coffee"])
@pytest.mark.parametrize("defect", realsets.DEFECTS)
def test_masks_are_exact_and_defects_visible(name: str, defect: str) -> None:
    for index in range(2):
        s = realsets.render_sample(name, seed=0, split="test", defect=defect, index=index,
                                   image_size=64)
        clean = s["clean"].astype(int)
        image = s["image"].astype(int)
        diff = np.abs(clean - image)
        diff = diff.max(axis=-1) if diff.ndim == 3 else diff
        mask = s["mask"] > 0
        assert set(np.unique(s["mask"])) == {0, 255}
        # Every pixel outside the mask is within the tolerance of the clean image, and every
        # pixel outside the defect's footprint is bit-identical.
        assert diff[~mask].max() <= realsets.TOLERANCE
        assert (diff[~s["footprint"]] == 0).all()
        # The mask only adds unchanged pixels inside the footprint (closing small gaps).
        assert not (mask & ~s["footprint"] & (diff <= realsets.TOLERANCE)).any()
        # Non-trivial size and a visible change over the mask.
        assert mask.sum() >= realsets.MIN_AREA_OF.get(defect, realsets.MIN_AREA) * mask.size
        assert diff[mask].mean() >= realsets.MIN_CONTRAST


def test_specks_are_small() -> None:
    shares = [(realsets.render_sample(name, seed=0, split="test", defect="speck", index=i,
                                      image_size=128)["mask"] > 0).mean()
              for name in ("brick", "coffee") for i in range(4)]
    assert all(0.0008 <= share <= 0.008 for share in shares), shares


def test_good_images_have_no_change() -> None:
    s = realsets.render_sample("grass", split="test", defect="good", index=4, image_size=32)
    assert np.array_equal(s["clean"], s["image"]) and not s["mask"].any()


def test_texture_crops_come_from_disjoint_regions() -> None:
    regions = realsets.texture_regions(512, 512)
    boxes = {split: np.zeros((512, 512), bool) for split in regions}
    for split, (y0, y1, x0, x1) in regions.items():
        boxes[split][y0:y1, x0:x1] = True
    assert not (boxes["train"] & boxes["test"]).any()
    assert not (boxes["train"] & boxes["val"]).any()
    assert not (boxes["val"] & boxes["test"]).any()
    for split in ("train", "val", "test"):
        y0, y1, x0, x1 = regions[split]
        for index in range(6):
            crop = realsets.render_sample("gravel", split=split, index=index,
                                          image_size=32)["crop"]
            assert y0 <= crop[0] < crop[1] <= y1 and x0 <= crop[2] < crop[3] <= x1
    with pytest.raises(ValueError, match="too small"):
        realsets.texture_regions(300, 300)


def test_no_network_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    realsets._photo.cache_clear()
    for name in realsets.SETS:  # every source and, through `foreign`, donor photos
        s = realsets.render_sample(name, split="test", defect="foreign", index=0, image_size=32)
        assert s["mask"].any()
    for donor in realsets.DONORS:
        assert realsets._photo(donor).size[0] > 0
    assert "pooch" not in sys.modules


def test_sets_load_through_the_mvtec_adapter(tmp_path: Path) -> None:
    for name in ("brick", "coins"):
        realsets.ensure_set(tmp_path, name, params=TINY)
    marker = tmp_path / "coins" / realsets.MARKER
    stamp = marker.stat().st_mtime_ns
    realsets.ensure_set(tmp_path, "coins", params=TINY)  # reused, not rewritten
    assert marker.stat().st_mtime_ns == stamp
    adapter = get_adapter("mvtec")
    assert adapter.categories(tmp_path) == ["brick", "coins"]
    assert len(adapter.list_samples(tmp_path, "brick", "train")) == 3
    assert len(adapter.list_samples(tmp_path, "brick", "val")) == 1
    test = adapter.list_samples(tmp_path, "coins", "test")
    assert sorted(s.defect for s in test) == sorted(["good", *realsets.DEFECTS])
    for s in test:
        image = load_image(s.image)
        assert image.shape == (32, 32, 3)
        if s.label == "anomalous":
            assert load_mask(s.mask, image.shape[:2]).any()


def test_gaussian_baseline_by_hand() -> None:
    rng = np.random.default_rng(0)
    # Only the red channel varies in training, so each pixel's covariance is diagonal:
    # diag(var, 0, 0) + ridge·I with ridge = RIDGE_REL · var / 3 + RIDGE_ABS.
    train = np.tile(np.array([0.5, 0.4, 0.3]), (50, 4, 4, 1))
    train[..., 0] += 0.1 * rng.standard_normal((50, 4, 4))
    model = quality.fit_gaussian(train)
    test = model.mean.copy()
    test[1, 2] += [0.2, 0.0, 0.0]  # along the varying channel
    test[3, 0] += [0.0, 0.03, 0.0]  # along a channel that never varied
    amap = quality.gaussian_map(model, test)
    var = train[:, 1, 2, 0].var(ddof=1)
    ridge = quality.RIDGE_REL * var / 3 + quality.RIDGE_ABS
    assert amap[1, 2] == pytest.approx(0.2 / np.sqrt(var + ridge), rel=1e-9)
    ridge = quality.RIDGE_REL * train[:, 3, 0, 0].var(ddof=1) / 3 + quality.RIDGE_ABS
    assert amap[3, 0] == pytest.approx(0.03 / np.sqrt(ridge), rel=1e-9)
    assert amap[3, 0] > amap[1, 2]  # a small change where nothing varies is the stronger one
    others = np.ones((4, 4), bool)
    others[1, 2] = others[3, 0] = False
    assert np.allclose(amap[others], 0.0)


def test_gaussian_baseline_finds_a_strong_defect() -> None:
    train = np.stack([realsets.render_sample("coins", split="train", index=i, image_size=48)
                      ["image"] for i in range(8)]).astype(float) / 255
    model = quality.fit_gaussian(np.repeat(train[..., None], 3, axis=-1))
    s = realsets.render_sample("coins", split="test", defect="foreign", index=1, image_size=48)
    amap = quality.gaussian_map(model, np.repeat(s["image"][..., None] / 255, 3, axis=-1))
    mask = s["mask"] > 0
    assert amap[mask].mean() > 2 * np.median(amap[~mask])


def test_quality_resume_continues_a_stopped_fit(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A benchmark fit stopped mid-way (a session's end) leaves its checkpoint in --keep-models;
    # the same command with --resume continues it into the model that the first run named.
    from stad.errors import Interrupted
    from stad.training.checkpoint import StopFlag

    argv = ["--quick", "--sets", "coins", "--teachers", "random", "--data", str(tmp_path / "d"),
            "--keep-models", str(tmp_path / "kept")]
    original = StopFlag.poll

    def stop_now(self: StopFlag) -> bool:
        self.request(signal.SIGTERM)
        return original(self)

    with monkeypatch.context() as mp:
        mp.setattr(StopFlag, "poll", stop_now)
        with pytest.raises(Interrupted):
            quality.main(argv)
    (stopped,) = (tmp_path / "kept").iterdir()
    assert stopped.name.endswith(".ckpt.safetensors")
    capsys.readouterr()
    assert quality.main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"resuming from {stopped}" in captured.err
    (model,) = (tmp_path / "kept").iterdir()  # the checkpoint gave way to the model
    assert model.name == stopped.name.replace(".ckpt.safetensors", ".safetensors")
    assert json.loads(captured.out)["results"]["coins"]["random"]["model"] == str(model)
    with pytest.raises(SystemExit) as info:
        quality.main(["--quick", "--resume"])
    assert info.value.code == 2
    assert "--resume continues the checkpoints kept in --keep-models" in capsys.readouterr().err


def test_quality_baseline_only_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    assert quality.main(["--quick", "--baseline-only", "--sets", "coins", "--data",
                         str(tmp_path)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    entry = data["results"]["coins"]["gaussian"]
    assert 0.0 <= entry["au_pro"]["fused"] <= 1.0
    assert set(entry["defects_au_pro"]) == set(realsets.DEFECTS)
    assert "coins | gaussian" in captured.err
    assert (tmp_path / "32px-seed0-6-2-2-1" / "coins" / realsets.MARKER).is_file()


def test_nearest_distance_matches_brute_force() -> None:
    import torch
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(10, 5, generator=gen), torch.randn(7, 5, generator=gen)
    expected = torch.cdist(queries.double(), bank.double()).min(1).values
    got = quality.nearest_distance(queries, bank, chunk=3)  # several chunks, a short last one
    assert got.shape == (10,)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert torch.allclose(quality.nearest_distance(bank[2:4], bank), torch.zeros(2), atol=1e-3)


def test_descriptor_bank_scores_its_own_training_pixels_zero() -> None:
    import torch

    from stad.networks import build_network
    torch.manual_seed(0)
    net = build_network(17).eval()
    train = torch.randn(2, 3, 20, 20)
    generator = torch.Generator().manual_seed(0)
    everything = quality.DescriptorBank.fit(net, train, 10_000, generator)  # all 800 pixels
    assert everything.bank.shape == (2 * 20 * 20, 128)
    own = everything.distances(train, batch=1)  # the same normalization as the bank's
    assert own.shape == (2, 20, 20) and own.abs().max() < 0.05
    other = everything.distances(torch.randn(1, 3, 20, 20))
    assert other.median() > 20 * own.abs().max() + 0.5
    sampled = quality.DescriptorBank.fit(net, train, 100, generator)
    assert sampled.bank.shape == (100, 128)
    assert (sampled.distances(train) > 0.05).any()  # pixels left out of the bank


def test_held_out_sets_are_only_scored_when_named(tmp_path: Path) -> None:
    # A held-out set must never enter a run that chooses settings by default.
    assert set(realsets.TUNED) == {"brick", "grass", "gravel", "coffee", "coins"}
    assert realsets.HELD_OUT == ("tissue", "moon", "retina")
    assert all(realsets.SETS[name].held_out for name in realsets.HELD_OUT)
    assert quality.parse_args([]).sets == list(realsets.TUNED)
    assert quality.parse_args(["--sets", "tissue"]).sets == ["tissue"]
    for name, shape in (("tissue", (32, 32, 3)), ("moon", (32, 32)), ("retina", (32, 32, 3))):
        s = realsets.render_sample(name, split="test", defect="foreign", index=1, image_size=32)
        assert s["image"].shape == shape and s["mask"].any(), name  # colour or grey as shot
    tiny = ["--image-size", "32", "--n-train", "1", "--n-val", "0", "--n-test-good", "0",
            "--n-test-per-defect", "0"]
    realsets.main(["--out", str(tmp_path / "default"), *tiny])
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == sorted(realsets.TUNED)
    realsets.main(["--out", str(tmp_path / "named"), "--sets", "tissue", *tiny])
    assert [p.name for p in (tmp_path / "named").iterdir()] == ["tissue"]


def test_quality_knn_needs_a_teacher_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        quality.parse_args(["--knn", "--baseline-only"])
    assert exc.value.code == 2
    assert "--baseline-only runs no teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        quality.parse_args(["--reference", "--reference-blocks", "four,ten"])
    assert exc.value.code == 2
    assert "--reference-blocks 'four,ten'" in capsys.readouterr().err


def test_quality_patch_sizes_take_scales_at_a_smaller_size(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = quality.parse_args(["--image-size", "256", "--patch-sizes", "33@128,17,17@128"])
    assert args.scale_names == ["p17", "p17@128", "p33@128"]  # the model's order
    for argv, message in ((["--image-size", "128", "--patch-sizes", "17@100"],
                           "--image-size 128 --patch-sizes 17@100: setting 'students'"),
                          (["--image-size", "256", "--patch-sizes", "17@128", "--knn"],
                           "--knn scores each patch size at --image-size")):
        with pytest.raises(SystemExit) as exc:
            quality.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_quality_knn_only_scores_descriptors_without_fitting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--quick", "--knn-only", "--teachers", "random", "--sets", "coins",
                         "--data", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["settings"]["knn"] is True
    runs = data["results"]["coins"]
    assert set(runs) == {"gaussian", "random (descriptor kNN)"}  # no student fit
    run = runs["random (descriptor kNN)"]
    assert set(run["au_pro"]) == {"fused", "p17"}
    assert 0.0 <= run["au_pro"]["fused"] <= 1.0 and 0.0 <= run["image_auroc"]["fused"] <= 1.0
    assert set(run["defects_au_pro"]) == set(realsets.DEFECTS)
    assert "coins | random (descriptor kNN)" in captured.err


def test_quality_backbone_reference_runs_beside_the_baseline(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The no-training EfficientNet-Lite0 nearest neighbour, with no teacher at all.
    assert quality.main(["--quick", "--baseline-only", "--reference", "--reference-size", "64",
                         "--sets", "coins", "--data", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["settings"]["reference"] == 64
    run = data["results"]["coins"]["efficientnet-lite0 kNN @ 64px"]
    assert 0.0 <= run["au_pro"]["fused"] <= 1.0 and 0.0 <= run["image_auroc"]["fused"] <= 1.0
    assert set(run["defects_au_pro"]) == set(realsets.DEFECTS)
    assert "coins | efficientnet-lite0 kNN @ 64px" in captured.err
    # Other blocks of the backbone: recorded, and a different reference.
    assert quality.main(["--quick", "--baseline-only", "--reference", "--reference-size", "64",
                         "--reference-blocks", "2,7", "--sets", "coins",
                         "--data", str(tmp_path)]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["settings"]["reference_blocks"] == "2,7"
    assert other["settings"]["reference_backbone"] == "efficientnet-lite0"
    assert other["results"]["coins"]["efficientnet-lite0 kNN @ 64px"]["au_pro"] != run["au_pro"]
    # A block the backbone lacks: one line naming the option, not a traceback.
    with pytest.raises(SystemExit) as exc:
        quality.main(["--quick", "--baseline-only", "--reference", "--reference-size", "64",
                      "--reference-blocks", "2,99", "--sets", "coins", "--data", str(tmp_path)])
    assert str(exc.value.code).startswith("error: --reference: reference blocks 2,99: "
                                          "efficientnet-lite0 has blocks 0..15")


def test_gaussian_blur_keeps_the_mass_and_spreads_a_peak() -> None:
    # backbone_knn's smoothing: stad's own (stad.handcrafted.gaussian_blur).
    from stad.handcrafted import gaussian_blur

    maps = torch.zeros(1, 33, 33, dtype=torch.float64)
    maps[0, 16, 16] = 1.0
    out = gaussian_blur(maps, 4.0)
    assert out.shape == maps.shape and abs(float(out.sum()) - 1.0) < 1e-9
    assert out[0, 16, 16] == out.max() and float(out[0, 16, 16]) < 0.02
    assert torch.allclose(out[0], out[0].T) and torch.allclose(out[0], out[0].flip(0))


@pytest.mark.slow
def test_quality_quick_run_with_a_random_teacher(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--quick", "--sets", "gravel",
         "--data", str(tmp_path), "--epochs", "1,2", "--precision", "bf16"],
        capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(result.stdout)
    assert data["settings"]["epochs"] == [1, 2] and data["settings"]["precision"] == "bf16"
    for epochs in (1, 2):
        run = data["results"]["gravel"][f"random @ {epochs} epochs"]
        assert set(run["au_pro"]) == {"fused", "p17"}
        assert 0.0 <= run["au_pro"]["fused"] <= 1.0 and 0.0 <= run["image_auroc"]["fused"] <= 1.0
        assert set(run["seconds"]) == {"fit", "calibrate", "evaluate"}
    assert "gravel | random @ 2 epochs" in result.stderr


@pytest.mark.slow
def test_quality_one_fit_evaluated_per_normalization_and_kept(tmp_path: Path) -> None:
    kept = tmp_path / "models"
    result = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--quick", "--sets", "coins",
         "--data", str(tmp_path / "data"), "--normalize", "global,position",
         "--smooth-sigma", "0,2", "--variance-weight", "0,1", "--keep-models", str(kept),
         "--fit-seed", "5", "--tta", "none,hflip"],
        capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(result.stdout)
    assert data["settings"]["normalize"] == ["global", "position"]
    # --fit-seed seeds the fit, not the data: the set is still the one drawn with seed 0.
    assert data["settings"]["seed"] == 0 and data["settings"]["fit_seed"] == 5
    assert [p.name for p in (tmp_path / "data").iterdir()][0].split("-")[1] == "seed0"
    assert data["settings"]["smooth_sigma"] == [0, 2]
    assert data["settings"]["variance_weight"] == [0, 1]
    assert data["settings"]["tta"] == ["none", "hflip"]
    label = "random ({} normalization, smooth σ {}, variance weight {}, tta {})"
    viewed = {t: data["results"]["coins"][label.format("position", 2, 0, t)]
              for t in ("none", "hflip")}
    assert [viewed[t]["tta"] for t in ("none", "hflip")] == ["none", "hflip"]
    assert viewed["none"]["au_pro"] != viewed["hflip"]["au_pro"]
    label = label.replace("{})", "none)")
    weighed = {w: data["results"]["coins"][label.format("position", 2, w)] for w in (0, 1)}
    assert [weighed[w]["variance_weight"] for w in (0, 1)] == [0, 1]
    assert weighed[0]["au_pro"] != weighed[1]["au_pro"]
    every = {(n, s): data["results"]["coins"][label.format(n, s, 1)]
             for n in ("global", "position") for s in (0, 2)}
    assert {r["seconds"]["fit"] for r in every.values()} == {every["global", 0]["seconds"]["fit"]}
    assert all(r["smooth_sigma"] == s for (_, s), r in every.items())
    runs = {n: every[n, 2] for n in ("global", "position")}
    assert runs["global"]["au_pro"] != runs["position"]["au_pro"]
    assert every["position", 0]["au_pro"] != every["position", 2]["au_pro"]
    (model,) = kept.glob("*.safetensors")
    assert runs["position"]["model"] == str(model)
    from safetensors import safe_open
    with safe_open(str(model), framework="pt") as f:  # calibrated as the last one says
        assert "calib_map.p17" in f.keys()
        assert f.metadata()["stad.seed"] == "5"

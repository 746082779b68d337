"""report.html of `stad evaluate --report`: self-contained, escaped, and loaded in a browser.

The browser test runs Debian's headless Chromium (`make test` installs it where it can; the
test says why it skips where it cannot): the page loads from file:// with no network, with no
console error, and every image decodes; a screenshot is kept under tests/artifacts/.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stad.datasets.base import Sample
from stad.evaluation import Evaluated, compute_metrics
from stad.report import markdown, page, training_curves, write_report

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"


def _items(tmp_path: Path) -> list[Evaluated]:
    """Four test images (two normal, two anomalous), one with a hostile file name."""
    rng = np.random.default_rng(0)
    items = []
    names = ["good_0.png", "good_1.png", "crack_<img src=x onerror=alert(1)>.png", "crack_1.png"]
    for i, name in enumerate(names):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
        anomalous = i >= 2
        mask = np.zeros((24, 32), bool)
        if anomalous:
            mask[5:12, 8:20] = True
        amap = rng.standard_normal((24, 32)).astype(np.float32) + 3 * mask
        sample = Sample(image=path, mask=path if anomalous else None,
                        label="anomalous" if anomalous else "normal", split="test",
                        defect="cr<ack>" if anomalous else "good")
        items.append(Evaluated(sample, {"p17": amap, "fused": amap}, mask,
                               {"p17": float(amap.max()), "fused": float(amap.max())}))
    return items


INFO = {"students": {"scales": {"p17": {"loss_per_epoch": [9.0, 5.0, 4.0]}}},
        "teacher": {"info": {"losses": {"p17": {"curve": [3.0, 2.0, 1.5]}}}}}


def test_the_page_is_self_contained_and_escapes_names(tmp_path: Path) -> None:
    items = _items(tmp_path)
    result = compute_metrics(items, 0.3, pixel_threshold=2.0)
    text = page(result, items, title="stad <evaluation>", threshold=2.5, pixel_threshold=2.0,
                info=INFO)
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched from anywhere
    assert "crack_&lt;img src=x onerror=alert(1)&gt;.png" in text and "cr&lt;ack&gt;" in text
    assert "<img src=x" not in text
    assert "<title>stad &lt;evaluation&gt;</title>" in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    # 4 images per card (image, overlay, predicted mask, ground truth), one card per test
    # image in its group: each anomalous image a hit or a miss, each normal one above the
    # threshold a false alarm.
    above = sum(e.scores["fused"] > 2.5 for e in items if e.sample.label == "normal")
    assert len(images) == 4 * (2 + above)
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
            assert picture.size == (192, 192)
            tile = np.asarray(picture.convert("RGB"))
        # the 24 × 32 image fits the square with its aspect kept: grey bands above and below
        assert (tile[:24] == 128).all() and (tile[-24:] == 128).all()
        assert not (tile[24:-24] == 128).all()
    assert text.count("<svg") == 4  # ROC, PRO, students' and teacher's losses
    assert "pixel F1" in text and "students: loss per epoch" in text


def test_the_markdown_keeps_hostile_names_inside_their_cells(tmp_path: Path) -> None:
    hostile = "a|b <img src=x> `c`\n*d* broken_large"
    items = [replace(e, sample=replace(e.sample, defect=hostile))
             if e.sample.label == "anomalous" else e for e in _items(tmp_path)]
    result = compute_metrics(items, 0.3)
    text = markdown(result, "t | <b>", {"calibration": {"normalize": "position",
                                                        "smooth_sigma": 2.0}})
    row = next(line for line in text.splitlines() if "broken_large" in line)
    # one cell per column, the defect's '|' escaped, no raw tag, no code span, one line
    assert row.startswith("| a\\|b \\<img src=x\\> \\`c\\` \\*d\\* broken_large | 2 |")
    assert row.replace("\\|", "").count("|") == 10
    assert text.startswith("# t \\| \\<b\\>\n")
    assert "Calibration: position normalization, smoothing σ 2, error + variance." in text


def test_the_page_says_how_the_maps_were_calibrated(tmp_path: Path) -> None:
    items = _items(tmp_path)
    result = compute_metrics(items, 0.3)
    for calibration, words in [({"normalize": "global", "smooth_sigma": 0}, "global "
                                "normalization, no smoothing"),
                               ({"normalize": "position", "smooth_sigma": 4.0},
                                "position normalization, smoothing σ 4, error + variance"),
                               ({"normalize": "position", "smooth_sigma": 2.0,
                                 "variance_weight": 0.0},
                                "position normalization, smoothing σ 2, error only"),
                               ({"normalize": "global", "smooth_sigma": 0,
                                 "variance_weight": 0.5},
                                "global normalization, no smoothing, error + 0.5 × variance"),
                               ({"normalize": "position", "smooth_sigma": 0,
                                 "variance_weight": 0.0, "image_score": "max"},
                                "no smoothing, error only, image score: maximum"),
                               ({"normalize": "position", "smooth_sigma": 0,
                                 "image_score": "topk_mean", "topk_fraction": 0.005},
                                "error + variance, image score: top 0.5 % mean")]:
        text = page(result, items, title="t", threshold=1.0, pixel_threshold=None,
                    info={**INFO, "calibration": calibration})
        assert words in text
    assert "normalization" not in page(result, items, title="t", threshold=None,
                                       pixel_threshold=None, info=INFO)


def _groups(text: str) -> dict[str, list[tuple[float, str]]]:
    """Per example group of a page: (score, verdict) of each card."""
    out = {}
    for part in text.split("<h3>")[1:]:
        name, _, rest = part.partition("</h3>")
        out[name] = [(float(score), verdict) for score, verdict in
                     re.findall(r"score ([-\d.]+), <span class=\"\w+\">(\w+)</span>", rest)]
    return out


def test_example_groups_hold_only_images_on_their_side_of_the_threshold(
        tmp_path: Path) -> None:
    items = _items(tmp_path)
    result = compute_metrics(items, 0.3)
    scores = sorted(e.scores["fused"] for e in items if e.sample.label == "anomalous")
    normal = sorted(e.scores["fused"] for e in items if e.sample.label == "normal")
    # between the two anomalous scores: one hit, one miss
    threshold = (scores[0] + scores[1]) / 2
    groups = _groups(page(result, items, title="t", threshold=threshold,
                          pixel_threshold=None, info={}))
    assert [v for _, v in groups["Best hits"]] == ["anomalous"]
    assert [v for _, v in groups["Worst misses"]] == ["ok"]
    assert groups["Best hits"][0][0] > threshold >= groups["Worst misses"][0][0]
    alarms = groups["Worst false alarms"]
    assert len(alarms) == sum(s > threshold for s in normal)
    assert all(v == "anomalous" and s > threshold for s, v in alarms)
    # above every score: no hits and no false alarms, each group says so
    text = page(result, items, title="t", threshold=scores[-1] + 1, pixel_threshold=None,
                info={})
    groups = _groups(text)
    assert groups["Best hits"] == [] and groups["Worst false alarms"] == []
    assert len(groups["Worst misses"]) == 2 and text.count("<p>(none)</p>") == 2
    # uncalibrated: by rank, no anomalous image in two groups
    groups = _groups(page(result, items, title="t", threshold=None, pixel_threshold=None,
                          info={}))
    assert list(groups)[-3:] == ["Highest-scoring anomalous images",
                                "Lowest-scoring anomalous images",
                                "Highest-scoring normal images"]
    assert len(groups["Highest-scoring anomalous images"]) == 2
    assert groups["Lowest-scoring anomalous images"] == []


def test_names_that_are_not_utf8_are_shown_as_escapes(tmp_path: Path) -> None:
    items = _items(tmp_path)
    odd = tmp_path / os.fsdecode(b"bad\xff.png")
    os.rename(items[0].sample.image, odd)
    items[0] = replace(items[0], sample=replace(items[0].sample, image=odd))
    result = compute_metrics(items, 0.3)
    write_report(tmp_path / "report", result, items, title=os.fsdecode(b"t\xfe"),
                 threshold=0.0, pixel_threshold=None)
    html_text = (tmp_path / "report" / "report.html").read_bytes().decode("utf-8")
    assert "bad\\xff.png" in html_text and "t\\xfe" in html_text
    md_text = (tmp_path / "report" / "report.md").read_bytes().decode("utf-8")
    assert md_text.startswith("# t\\xfe\n")


def test_training_curves_need_recorded_losses() -> None:
    assert training_curves({}) == []
    assert len(training_curves(INFO)) == 2


@pytest.mark.parametrize("info", [
    {"students": ["x"]},
    {"students": {"scales": {"p17": {"loss_per_epoch": ["a", "b"]}}}},
    {"students": {"scales": {"p17": {"loss_per_epoch": [1.0, float("nan")]}, "p33": 3}}},
    {"teacher": {"info": {"losses": {"p17": {"curve": {"a": 1}}}, "scales": "x"}}},
    {"teacher": {"info": {"scales": {"p17": {"losses": [1, 2]}}}}},
    {"teacher": "x"},
])
def test_training_curves_leave_out_what_stad_does_not_write(info: dict) -> None:
    """A model's metadata is untrusted: a malformed record crashed `evaluate --report` (exit 1)
    after metrics.json was written."""
    assert training_curves(info) == []
    mixed = {**info, "students": INFO["students"]} if "teacher" in info else info
    assert len(training_curves(mixed)) == (1 if "teacher" in info else 0)


def test_write_report_writes_the_folder(tmp_path: Path) -> None:
    items = _items(tmp_path)
    result = compute_metrics(items, 0.3)
    written = write_report(tmp_path / "report", result, items, title="t", threshold=None)
    names = {Path(w).name for w in written}
    assert {"metrics.json", "report.html", "report.md", "examples.png"} <= names
    assert (tmp_path / "report" / "report.html").stat().st_size > 1000


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHECK = """<script>
addEventListener("load", () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const out = document.createElement("pre");
  out.id = "stad-check";
  out.textContent = `images ${document.images.length} broken ${bad}`;
  document.body.append(out);
});
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed "
                    "(make test installs it with apt-get where it runs as root)")
def test_report_loads_in_headless_chromium(tmp_path: Path) -> None:
    items = _items(tmp_path)
    result = compute_metrics(items, 0.3, pixel_threshold=2.0)
    folder = tmp_path / "report"
    write_report(folder, result, items, title="browser check", threshold=2.5,
                 pixel_threshold=2.0, info=INFO)
    # The test's copy gets a script that counts the images that failed to decode; the
    # report itself has none.
    checked = folder / "checked.html"
    checked.write_text((folder / "report.html").read_text().replace("</body>",
                                                                     CHECK + "</body>"))
    chromium = _chromium()
    assert chromium is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([chromium, *flags, "--dump-dom", checked.as_uri()], env=env,
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    above = sum(e.scores["fused"] > 2.5 for e in items if e.sample.label == "normal")
    assert f"images {4 * (2 + above)} broken 0" in dom.stdout, dom.stdout[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    run = subprocess.run([chromium, *flags, "--window-size=1300,2400",
                          f"--screenshot={shot}", (folder / "report.html").as_uri()],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as picture:
        assert picture.size == (1300, 2400)


def test_curves_with_one_point_or_non_finite_values_still_draw() -> None:
    from stad.report import _svg

    one = _svg("one", {"a": (np.array([1.0]), np.array([2.0]))}, xlabel="x", ylabel="y")
    assert "<circle" in one and "nan" not in one
    bad = _svg("bad", {"a": (np.array([0.0, 0.5, 1.0]), np.array([1.0, np.nan, np.inf]))},
               xlabel="x", ylabel="y")
    assert "nan" not in bad and "inf" not in bad and "<circle" in bad
    empty = _svg("empty", {"a": (np.array([]), np.array([]))}, xlabel="x", ylabel="y")
    assert 'points=""' in empty


def test_maps_are_coloured_up_to_the_pixel_threshold(tmp_path: Path) -> None:
    from stad.scorefiles import write_maps

    amap = np.tile(np.linspace(0, 4, 9, dtype=np.float32), (4, 1))  # 0, 0.5, ..., 4
    image = np.zeros((4, 9, 3), np.float32)

    def heat_of(**thresholds: float | None) -> np.ndarray:
        name = write_maps(tmp_path, f"image{len(list(tmp_path.iterdir()))}", amap, image,
                          **thresholds)
        return np.asarray(Image.open(name.replace("_map.tiff", "_heat.png")))[0]

    full = heat_of(threshold=None, pixel_threshold=None)[-1]  # the map's maximum: the top colour
    # The pixel threshold (3) is where the colour saturates, not the lower image threshold (1).
    heat = heat_of(threshold=1.0, pixel_threshold=3.0)
    assert (heat[6:] == full).all() and not (heat[5] == full).all()
    # A calibration without a pixel threshold: the image threshold.
    heat = heat_of(threshold=1.0, pixel_threshold=None)
    assert (heat[2:] == full).all() and not (heat[1] == full).all()

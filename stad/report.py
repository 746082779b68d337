"""The report folder of ``stad evaluate --report DIR``.

- ``metrics.json``: every figure;
- ``report.html``: one self-contained page (no network: images inline, curves as SVG, no
  script): the metrics per scale and per defect type, the image ROC and PRO curves, the
  training losses recorded in the model, and cards of test images (image, heat-map overlay,
  predicted mask, ground truth, score and verdict) for the best hits, the worst misses and the
  worst false alarms;
- ``report.md`` and ``examples.png``: the same metrics and examples for a Markdown viewer,
  and with matplotlib ``roc.png`` and ``pro.png``.

Every name in the page (file names, defect types, the title) is escaped: test data are
untrusted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stad import metrics
from stad.artifacts import finite_number
from stad.calibration import describe_calibration
from stad.evaluation import Evaluated
from stad.fsutil import atomic_write_bytes, atomic_write_text, check_output_dir
from stad.images import load_image
from stad.visualize import display_range, overlay

_COLUMNS = ("au_pro", "pixel_auroc", "image_auroc", "image_ap", "pixel_ap", "pixel_f1",
            "pixel_iou")
CARDS = 6  # test images per group of the HTML report
SIDE = 192  # pixels of a picture in the HTML report
MAX_POINTS = 400  # points per curve in the SVGs


def _headers(fpr_limit: float) -> list[str]:
    return [f"AU-PRO@{fpr_limit:g}", "pixel AUROC", "image AUROC", "image AP", "pixel AP",
            "pixel F1", "pixel IoU"]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "–"


# Characters that would end a table cell, start emphasis, a link or a code span, or carry
# HTML: escaped with a backslash, so a defect type or title read from a folder name stays
# text in its cell (underscores inside words, as in MVTec's `broken_large`, are left alone).
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|&~])")


def _md(text: str) -> str:
    """``text`` as literal Markdown on one line (line breaks become spaces)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def markdown(result: dict[str, Any], title: str, info: Mapping[str, Any] | None = None) -> str:
    """The metrics as Markdown tables: per map, then per defect type of the fused map."""
    head = ["map", *_headers(result["fpr_limit"])]
    facts = describe_calibration((info or {}).get("calibration"))
    lines = [f"# {_md(title)}", "", *([f"Calibration: {_md(facts)}.", ""] if facts else []),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, entry in result["maps"].items():
        lines.append(f"| {_md(key)} | "
                     + " | ".join(_fmt(entry.get(c)) for c in _COLUMNS) + " |")
    lines += ["", "## Per defect type (fused map, with all good images)", "",
              "| defect | images | " + " | ".join(head[1:]) + " |",
              "|" + "---|" * (len(head) + 1)]
    for d, entry in result["maps"]["fused"]["defects"].items():
        lines.append(f"| {_md(d)} | {entry['n_anomalous']} | "
                     + " | ".join(_fmt(entry.get(c)) for c in _COLUMNS) + " |")
    return _shown("\n".join(lines) + "\n")


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _examples(items: Sequence[Evaluated], k: int,
              threshold: float | None) -> dict[str, list[Evaluated]]:
    """Up to k test images per group. With an image threshold: the best hits (anomalous images
    flagged, highest score first), the worst misses (anomalous images not flagged, lowest
    first) and the worst false alarms (normal images flagged, highest first), so that every
    card of a group is on its side of the threshold. Without one (an uncalibrated model):
    the highest- and lowest-scoring anomalous images (none in both) and the highest-scoring
    normal ones."""
    anomalous = sorted((e for e in items if e.sample.label == "anomalous"),
                       key=lambda e: -e.scores["fused"])
    normal = sorted((e for e in items if e.sample.label == "normal"),
                    key=lambda e: -e.scores["fused"])
    if threshold is None:
        high = anomalous[:k]
        return {"highest-scoring anomalous images": high,
                "lowest-scoring anomalous images": anomalous[len(high):][::-1][:k],
                "highest-scoring normal images": normal[:k]}
    flagged = [e for e in anomalous if e.scores["fused"] > threshold]
    return {"best hits": flagged[:k],
            "worst misses": [e for e in anomalous[::-1] if e.scores["fused"] <= threshold][:k],
            "worst false alarms": [e for e in normal if e.scores["fused"] > threshold][:k]}


def _fit(tile: np.ndarray, side: int, nearest: bool) -> np.ndarray:
    """``tile`` scaled to fit a side × side square, its aspect kept (centred on a neutral
    grey); masks scaled by the nearest pixel, so that they stay two-valued."""
    from PIL import Image

    h, w = tile.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = Image.fromarray(tile).resize(
        size, Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC)
    out = np.full((side, side, 3), 128, np.uint8)
    top, left = (side - size[1]) // 2, (side - size[0]) // 2
    out[top:top + size[1], left:left + size[0]] = np.asarray(picture)
    return out


def _tiles(e: Evaluated, threshold: float | None, pixel_threshold: float | None,
           side: int) -> dict[str, np.ndarray]:
    """image, overlay (coloured up to the pixel threshold, as ``score --maps``), predicted mask
    (with a pixel threshold) and ground truth, each fitted into side × side."""
    image = load_image(e.sample.image)
    lo, hi = display_range(e.maps["fused"], pixel_threshold, threshold)
    gray = (e.mask * 255).astype(np.uint8)
    tiles = {"image": (image * 255).astype(np.uint8),
             "overlay": overlay(image, e.maps["fused"], lo, hi)}
    if pixel_threshold is not None:
        tiles["predicted"] = np.repeat(((e.maps["fused"] > pixel_threshold) * 255)
                                       .astype(np.uint8)[..., None], 3, axis=2)
    tiles["ground truth"] = np.repeat(gray[..., None], 3, axis=2)
    return {k: _fit(t, side, nearest=k in ("predicted", "ground truth"))
            for k, t in tiles.items()}


def grid(items: Sequence[Evaluated], threshold: float | None, k: int = 4,
         pixel_threshold: float | None = None) -> np.ndarray:
    """examples.png: rows of image | overlay | ground truth for each group of
    :func:`_examples` (k of each), in its order."""
    side = 160
    rows = [np.concatenate([t[c] for c in ("image", "overlay", "ground truth")], axis=1)
            for group in _examples(items, k, threshold).values()
            for t in (_tiles(e, threshold, pixel_threshold, side) for e in group)]
    if not rows:
        return np.zeros((side, 3 * side, 3), np.uint8)
    return np.concatenate(rows, axis=0)


def _shown(text: str) -> str:
    """``text`` writable as UTF-8: a file name's bytes that are not UTF-8 (Python keeps them
    as lone surrogates) shown as escapes such as ``\\xff``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---- report.html ------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1300px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px}
.card img{width:SIDEpx;height:SIDEpx;image-rendering:pixelated;margin-right:2px}
.card p{margin:4px 0;font-size:13px;word-break:break-all;max-width:ROWpx}
.bad{color:#b00}.good{color:#070}svg{background:#fafafa;border:1px solid #ccc;margin:4px}
.legend{font-size:12px}
""".replace("SIDE", str(SIDE)).replace("ROW", str(4 * SIDE + 8))

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _svg(title: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, xlabel: str,
         ylabel: str, xmax: float = 1.0, ymax: float | None = None,
         vline: float | None = None) -> str:
    """A line chart as inline SVG: each curve (x, y) thinned to MAX_POINTS points."""
    w, h, m = 420, 300, 40
    finite = [v[np.isfinite(v)] for v in (np.asarray(y, dtype=float)
                                          for _, y in curves.values())]
    top = ymax if ymax is not None else max([float(v.max()) for v in finite if v.size] + [1e-9])
    bottom = 0.0 if ymax is not None else min([float(v.min()) for v in finite if v.size]
                                              + [0.0])
    span = top - bottom if top > bottom else 1.0

    def px(x: float, y: float) -> str:
        return f"{m + (w - 2 * m) * min(x, xmax) / xmax:.1f}," \
               f"{h - m - (h - 2 * m) * (y - bottom) / span:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{w / 2}" y="18" text-anchor="middle">{html.escape(title)}</text>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#444"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#444"/>',
             f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="12">'
             f'{html.escape(xlabel)} (0–{xmax:g})</text>',
             f'<text x="12" y="{h / 2}" font-size="12" transform="rotate(-90 12 {h / 2})" '
             f'text-anchor="middle">{html.escape(ylabel)} ({bottom:.3g}–{top:.3g})</text>']
    if vline is not None:
        a, b = px(vline, bottom), px(vline, top)
        parts.append(f'<line x1="{a.split(",")[0]}" y1="{a.split(",")[1]}" '
                     f'x2="{b.split(",")[0]}" y2="{b.split(",")[1]}" stroke="#999" '
                     'stroke-dasharray="4 3"/>')
    for i, (name, (x, y)) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        shown = np.isfinite(x) & np.isfinite(y) & (x <= xmax)  # thinned within the axes
        x, y = x[shown], y[shown]
        keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), MAX_POINTS)).astype(int)) \
            if len(x) else np.array([], int)
        points = [px(float(x[j]), float(y[j])) for j in keep]
        if len(points) == 1:  # one point: a dot, a line needs two
            cx, cy = points[0].split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                         f'points="{" ".join(points)}"/>')
        parts.append(f'<text class="legend" x="{w - m - 150}" y="{m + 14 * i}" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


Curves = tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, metrics.ProResult]]


def curves(items: Sequence[Evaluated], fpr_limit: float) -> Curves:
    """Per map, the image ROC (fpr, tpr) and the PRO curve, each computed once for the page
    and the plots; empty where the test split lacks what they need."""
    labels = [e.sample.label == "anomalous" for e in items]
    keys = list(items[0].maps)
    roc = ({k: metrics.roc_curve([e.scores[k] for e in items], labels) for k in keys}
           if 0 < sum(labels) < len(labels) else {})
    pix = [e for e in items if e.sample.label == "normal" or e.sample.mask is not None]
    pro = ({k: metrics.au_pro([e.maps[k] for e in pix], [e.mask for e in pix],
                              fpr_limit=fpr_limit) for k in keys}
           if any(e.mask.any() for e in pix) else {})
    return roc, pro


def _curve_svgs(found: Curves, fpr_limit: float) -> list[str]:
    roc, pro = found
    out = []
    if roc:
        out.append(_svg("image ROC", roc, xlabel="false positive rate",
                        ylabel="true positive rate", ymax=1.0))
    if pro:
        out.append(_svg("PRO curve", {f"{k} ({r.au_pro:.3f})": (r.fpr, r.pro)
                                      for k, r in pro.items()},
                        xlabel="false positive rate (pixels)", ylabel="per-region overlap",
                        xmax=min(1.0, 2 * fpr_limit), ymax=1.0, vline=fpr_limit))
    return out


def _series(value: Any) -> np.ndarray | None:
    """A recorded loss curve as floats; None where the record is not a list of finite numbers
    (a model's metadata is read as untrusted: a malformed curve is left out, not a crash)."""
    if not isinstance(value, list) or not value or not all(finite_number(v) for v in value):
        return None
    return np.asarray(value, dtype=float)


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    found = value.get(key) if isinstance(value, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def training_curves(info: Mapping[str, Any]) -> list[str]:
    """SVGs of the losses a model artifact recorded: the students' loss per epoch per scale,
    and the teacher's pretraining curve per scale (mean loss of each twentieth of the run).
    Records that are not what stad writes are left out."""
    out = []
    per_epoch = {}
    for k, v in _mapping(_mapping(info, "students"), "scales").items():
        loss = _series(v.get("loss_per_epoch")) if isinstance(v, Mapping) else None
        if loss is not None:
            per_epoch[str(k)] = (np.arange(1, len(loss) + 1, dtype=float), loss)
    if per_epoch:
        longest = max(len(x) for x, _ in per_epoch.values())
        out.append(_svg("students: loss per epoch", per_epoch, xlabel="epoch",
                        ylabel="loss", xmax=float(longest)))
    teacher = _mapping(_mapping(info, "teacher"), "info")
    losses = _mapping(teacher, "losses") or {k: _mapping(v, "losses") for k, v in
                                             _mapping(teacher, "scales").items()}
    curves = {}
    for k, v in losses.items():
        curve = _series(v.get("curve")) if isinstance(v, Mapping) else None
        if curve is not None:
            curves[str(k)] = (np.linspace(0.05, 1.0, len(curve)), curve)
    if curves:
        out.append(_svg("teacher pretraining: loss", curves, xlabel="share of the run",
                        ylabel="loss"))
    return out


def _img(array: np.ndarray, alt: str) -> str:
    data = base64.b64encode(_png(array)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cards(items: Sequence[Evaluated], threshold: float | None,
           pixel_threshold: float | None) -> str:
    out = []
    for group, chosen in _examples(items, CARDS, threshold).items():
        out.append(f"<h3>{html.escape(group.capitalize())}</h3><div class=\"cards\">")
        if not chosen:
            out.append("<p>(none)</p>")
        for e in chosen:
            tiles = _tiles(e, threshold, pixel_threshold, SIDE)
            score = e.scores["fused"]
            flagged = threshold is not None and score > threshold
            right = flagged == (e.sample.label == "anomalous")
            verdict = "anomalous" if flagged else "ok"
            what = e.sample.defect or e.sample.label
            out.append(
                '<div class="card">' + "".join(_img(t, k) for k, t in tiles.items())
                + f"<p>{html.escape(str(e.sample.image))}</p><p>{html.escape(str(what))}: "
                f"score {score:.3f}, <span class=\"{'good' if right else 'bad'}\">{verdict}"
                "</span></p></div>")
        out.append("</div>")
    return "".join(out)


def _table(result: dict[str, Any]) -> str:
    head = _headers(result["fpr_limit"])
    rows = ["<table><tr><th>map</th>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for key, entry in result["maps"].items():
        rows.append(f"<tr><td>{html.escape(key)}</td>"
                    + "".join(f"<td>{_fmt(entry.get(c))}</td>" for c in _COLUMNS) + "</tr>")
    rows.append("</table><h3>Per defect type (fused map, with all good images)</h3>"
                "<table><tr><th>defect</th><th>images</th>"
                + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for d, entry in result["maps"]["fused"]["defects"].items():
        rows.append(f"<tr><td>{html.escape(str(d))}</td><td>{entry['n_anomalous']}</td>"
                    + "".join(f"<td>{_fmt(entry.get(c))}</td>" for c in _COLUMNS) + "</tr>")
    return "".join(rows) + "</table>"


def page(result: dict[str, Any], items: Sequence[Evaluated], *, title: str,
         threshold: float | None, pixel_threshold: float | None,
         info: Mapping[str, Any], found: Curves | None = None) -> str:
    """report.html: one self-contained page (``found``: :func:`curves`, computed if None)."""
    n_anomalous = sum(e.sample.label == "anomalous" for e in items)
    calibrated = describe_calibration(info.get("calibration"))
    facts = (f"{len(items)} test images ({n_anomalous} anomalous); image threshold "
             f"{_fmt(threshold)}; pixel threshold {_fmt(pixel_threshold)}"
             + (f"; {calibrated}" if calibrated else ""))
    svgs = _curve_svgs(found if found is not None else curves(items, result["fpr_limit"]),
                       result["fpr_limit"])
    training = training_curves(info)
    body = [f"<h1>{html.escape(title)}</h1><p>{html.escape(facts)}</p>",
            "<h2>Metrics</h2>", _table(result),
            "<h2>Curves</h2>", "".join(svgs) or "<p>(no curves: the test split lacks "
            "normal or anomalous images)</p>"]
    if training:
        body += ["<h2>Training</h2>", "".join(training)]
    body += ["<h2>Examples</h2><p>Each card: the image, the fused map over it (coloured up "
             "to the " + ("pixel" if pixel_threshold is not None else "image") + " threshold)"
             + (", the predicted mask (map above the pixel threshold)"
                if pixel_threshold is not None else "")
             + ", the ground truth; the file, the defect type, the score and the verdict "
             "(green: right, red: wrong).</p>", _cards(items, threshold, pixel_threshold)]
    return _shown("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                  f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
                  + "".join(body) + "</body></html>\n")


def write_report(folder: Path, result: dict[str, Any], items: Sequence[Evaluated],
                 *, title: str, threshold: float | None, pixel_threshold: float | None = None,
                 info: Mapping[str, Any] | None = None) -> list[str]:
    """metrics.json, report.html, report.md, examples.png and (with matplotlib) roc.png and
    pro.png, each written atomically; returns their paths."""
    check_output_dir(folder)  # made here, or a one-line error naming it
    atomic_write_text(folder / "metrics.json", json.dumps(result, indent=2) + "\n")
    found = curves(items, result["fpr_limit"])
    atomic_write_text(folder / "report.html",
                      page(result, items, title=title, threshold=threshold,
                           pixel_threshold=pixel_threshold, info=info or {}, found=found))
    text = markdown(result, title, info)
    plots = _plots(folder, found, result["fpr_limit"])
    text += ("\n![ROC](roc.png) ![PRO](pro.png)\n" if plots else
             "\n(ROC and PRO plots skipped: install matplotlib, `pip install stad[plots]`; "
             "report.html has them without it)\n")
    groups = list(_examples([], 0, threshold))
    text += ("\n## Examples\n\nRows: up to four each of the " + ", the ".join(groups[:-1])
             + " and the " + groups[-1] + " (the groups of report.html; an empty group has no "
             "rows). Columns: image, fused map over the image, ground truth.\n\n"
             "![examples](examples.png)\n")
    atomic_write_text(folder / "report.md", text)
    atomic_write_bytes(folder / "examples.png",
                       _png(grid(items, threshold, pixel_threshold=pixel_threshold)))
    written = ["metrics.json", "report.html", "report.md", "examples.png", *plots]
    return [str(folder / w) for w in written]


def _plots(folder: Path, found: Curves, fpr_limit: float) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    roc, pro = found
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, (fpr, tpr) in roc.items():
        ax.plot(fpr, tpr, label=key)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC")
    ax.legend()
    _save_fig(fig, folder / "roc.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, r in pro.items():
        ax.plot(r.fpr, r.pro, label=f"{key} ({r.au_pro:.3f})")
    ax.axvline(fpr_limit, color="grey", linestyle=":")
    ax.set(xlim=(0, min(1.0, 2 * fpr_limit)), xlabel="false positive rate (pixels)",
           ylabel="per-region overlap", title="PRO curve")
    ax.legend()
    _save_fig(fig, folder / "pro.png")
    plt.close("all")
    return ["roc.png", "pro.png"]


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())

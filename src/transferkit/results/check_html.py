"""check.html: every finding of `transferkit data check` with its pictures side by side, in one
self-contained file (thumbnails are data URIs, the CSS is the run report's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_text
from ..preprocessing import SIXTEEN_BIT_WHITE
from .report import _CSS, _e, _table, _thumbnail_uri

_EXTRA_CSS = """
.row{display:flex;gap:.6em;align-items:flex-start;margin:.6em 0;padding:.4em;border-bottom:1px solid #eef1f6}
.row .why{min-width:14em;flex:0 1 auto;font-size:.85em}.row figure{flex:none}
.leakage{color:#b3261e;font-weight:600}.conflict{color:#a05a00;font-weight:600}
"""


def write_check_html(report: dict, path: Path) -> Path:
    from ..datacheck import label_error_method

    root = _Pictures(Path(report["data"]), report.get("sixteen_bit_white") or SIXTEEN_BIT_WHITE)
    th = report["thresholds"]
    sections = [
        f"<h1>Data check</h1><p class=\"sub\">{_e(report['data'])}: {report['summary']['images']} images, "
        f"{_e(report['split_source'])} split, features {_e(report['features']['model'])}; "
        f"{report['seconds']:.1f} s</p>",
        _counts_table(report),
        _section("Exact duplicates (same sha256)", report, "exact_duplicates",
                 lambda r: _pair_row(root, r, f"sha256 {r['sha256']}…")),
        _section(f"Near-duplicates (embedding cosine ≥ {th['near_cosine']}, thumbnail correlation ≥ "
                 f"{th['near_pixel']} under mild crops)", report, "near_duplicates",
                 lambda r: _pair_row(root, r, f"cosine {r['cosine']}, pixels {r['pixel']}")),
        _section(f"Likely label errors ({label_error_method(report)}; lowest self-confidence first, shown with the "
                 "nearest images of the class the probe believes)", report, "label_errors",
                 lambda r: _label_row(root, r)),
        _section(f"Outliers (kNN distance, robust z ≥ {th['outlier_z']})", report, "outliers",
                 lambda r: _row([_figure(root, r)], f"distance {r['knn_distance']}, z {r['robust_z']}; "
                                f"nearest class {r['nearest_class']}")),
        "<h2>Unusable files</h2>" + (_table(["kind", "path", "detail"], [(u["kind"], u["path"], u["detail"])
                                                                          for u in report["unusable_files"]])
                                     if report["unusable_files"] else "<p>none</p>"),
        _sizes(report),
    ]
    html = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>transferkit data check</title>"
            f"<style>{_CSS}{_EXTRA_CSS}</style></head><body>{''.join(sections)}</body></html>")
    return atomic_write_text(path, html)


def _counts_table(report: dict) -> str:
    rows = [(name.replace("_", " "), n) for name, n in report["counts"].items()]
    return "<h2>Counts</h2>" + _table(["finding", "count"], rows)


def _section(title: str, report: dict, kind: str, render) -> str:
    rows = report[kind]
    counts = report["counts"]
    total = counts.get(f"{kind[:-1]}_pairs", counts.get("label_disagreements" if kind == "label_errors" else kind))
    more = f" (the first {len(rows)} of {total})" if total > len(rows) else ""
    body = "".join(render(r) for r in rows) if rows else "<p>none found</p>"
    return f"<h2>{_e(title)}{_e(more)}</h2>{body}"


@dataclass(frozen=True)
class _Pictures:
    """Where the checked images are, and the white their 16-bit grey images are read with (the scan's)."""

    folder: Path
    sixteen_bit_white: int


def _figure(root: _Pictures, item: dict, note: str = "") -> str:
    uri = _thumbnail_uri(root.folder / item["path"], root.sixteen_bit_white)
    img = f'<img alt="{_e(item["path"])}" src="{uri}">' if uri else '<p class="na">cannot be read</p>'
    caption = f"<code>{_e(item['path'])}</code><br>{_e(item['class'])} · {_e(item['split'])}{_e(note)}"
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _row(figures: list[str], why: str, css: str = "") -> str:
    return f'<div class="row"><div class="why {css}">{_e(why)}</div>{"".join(figures)}</div>'


def _pair_row(root: _Pictures, pair: dict, scores: str) -> str:
    relation = pair["relation"]
    return _row([_figure(root, pair["a"]), _figure(root, pair["b"])],
                f"{relation.replace('_', ' ')}: {scores}", relation)


def _label_row(root: _Pictures, row: dict) -> str:
    figures = [_figure(root, row, f" (self-confidence {row['self_confidence']})")]
    figures += [_figure(root, n) for n in row["neighbours_of_suggested"]]
    verdict = "confident learning: label issue" if row["confident"] else "probe disagrees"
    return _row(figures, f"labelled {row['class']}, looks like {row['suggested']} "
                         f"(p = {row['suggested_probability']}; {verdict})")


def _sizes(report: dict) -> str:
    sizes = report["summary"].get("sizes")
    if not sizes:
        return ""
    rows = [(axis, sizes[axis]["min"], sizes[axis]["median"], sizes[axis]["max"]) for axis in ("width", "height")]
    common = ", ".join(f"{c['size']} ({c['images']})" for c in sizes["most_common"])
    counts = report["summary"]["counts"]
    balance = [(name, counts["train"][name], counts["val"][name]) for name in report["classes"]]
    return ("<h2>Classes and image sizes</h2>" + _table(["class", "train", "val"], balance)
            + _table(["", "min", "median", "max"], rows)
            + f"<p>{sizes['distinct']} distinct sizes; most common: {_e(common)}</p>")

"""One self-contained HTML report for a run folder.

The report must open anywhere, offline and from an e-mail attachment, so it has no external
references at all: images are base64 data URIs, the CSS is inline, fonts are system fonts.
Every file in the run folder is optional; a missing piece is shown as "not available".
Every string that came from the user or the file system is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


from transferkit.errors import CheckpointError, DataError
from transferkit.io import atomic_write_text
from transferkit.preprocessing import SIXTEEN_BIT_WHITE
from transferkit.results import plots
from transferkit.run_folder import RunFolder

log = logging.getLogger(__name__)

# Long problem lists and galleries would make the report huge and slow to open;
# past these caps the report says how many more there are.
MAX_PROBLEM_FILES = 200
MAX_GALLERY_ITEMS = 32
THUMBNAIL_SIZE = 160

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em;color:#1d2430;background:#fff;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #d5dbe5;padding-bottom:.2em;margin-top:1.8em}
.sub{color:#5a6372;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #d5dbe5;border-radius:6px;padding:.6em 1em;min-width:8em;background:#f5f7fb}
.card .v{font-size:1.5em;font-weight:600}.card .k{color:#5a6372;font-size:.85em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #d5dbe5;padding:.25em .6em;text-align:left}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.fig{max-width:100%;height:auto;border:1px solid #eef1f6}
.na{color:#8a93a3;font-style:italic}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;width:180px;font-size:.8em}figure img{display:block;margin-bottom:.2em}
figcaption code{word-break:break-all}
p,td:not(.num),figcaption,summary,.why{overflow-wrap:anywhere}
pre{background:#f5f7fb;padding:.8em;overflow:auto}pre.command{white-space:pre-wrap}pre.command span{white-space:nowrap}
details{margin:.3em 0}summary{cursor:pointer}
"""


# ---------------------------------------------------------------- loading the run folder


def _read_config(path: Path) -> tuple[Any, str | None]:
    """(parsed YAML or None, raw text or None); the raw text is the fallback display."""
    if not path.is_file():
        return None, None
    raw = path.read_text(encoding="utf-8", errors="replace")
    try:
        import yaml  # local: only the report needs it

        return yaml.safe_load(raw), raw
    except Exception as exc:  # bad YAML or no PyYAML: still show the text
        from transferkit.config import yaml_problem

        log.warning("report: cannot parse %s (%s)", path, yaml_problem(exc))
        return None, raw


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _read_history(run: RunFolder, metrics: dict | None) -> list[dict]:
    """Per-epoch rows from history.csv, falling back to metrics.json's copy."""
    path = run.history
    if path.is_file():
        try:
            with path.open(newline="", encoding="utf-8") as f:
                return [{k: _number(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
        except (OSError, csv.Error, ValueError) as exc:  # ValueError: not UTF-8 (saved again by a spreadsheet)
            log.warning("report: cannot read %s (%s)", path, exc)
    history = (metrics or {}).get("history")
    return [dict(row) for row in history if isinstance(row, dict)] if isinstance(history, list) else []


def _ensure_figures(run: RunFolder, history: list[dict], evaluation: dict | None, classes: Sequence[str]) -> None:
    """Draw curves.png / confusion.png from the data when the engine did not write them."""
    if plots.has_curve(history) and not run.curves.is_file():
        plots.plot_history(history, run.curves)
    cm = (evaluation or {}).get("confusion_matrix")
    if isinstance(cm, list) and classes and len(cm) == len(classes) and not run.confusion.is_file():
        try:
            plots.plot_confusion(cm, classes, run.confusion)
        except ValueError as exc:  # malformed matrix: report it as unavailable
            log.warning("report: cannot draw confusion matrix (%s)", exc)


def _classes(*records: dict | None) -> list[str]:
    """The class names of the first record that lists them (a damaged record's other value is passed over)."""
    for record in records:
        names = (record or {}).get("classes")
        if isinstance(names, list) and names:
            return [str(c) for c in names]
    return []


# ---------------------------------------------------------------- small HTML helpers


def _e(value: Any) -> str:
    return escape(str(value).translate(plots.BIDI_CONTROLS), quote=True)


def _na(what: str = "not available") -> str:
    return f'<p class="na">{_e(what)}</p>'


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Small numbers such as learning rates would print as 0.0000 in fixed point.
        return f"{value:.{digits}f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
    return str(value)


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}%" if isinstance(value, (int, float)) else "n/a"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            cells.append(f'<td class="num">{_e(_fmt(cell))}</td>' if numeric else f"<td>{_e(_fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _data_uri(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return _na(f"{path.name}: not available")
    return f'<img class="fig" alt="{_e(alt)}" src="{_data_uri(path.read_bytes())}">'


def _thumbnail_uri(path: Any, sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> str | None:
    """A small PNG data URI of an image file, or None when it cannot be read."""
    from ..data.images import load_thumbnail

    try:
        buffer = io.BytesIO()
        load_thumbnail(path, THUMBNAIL_SIZE, sixteen_bit_white).save(buffer, format="PNG")
    except (DataError, OSError, ValueError, TypeError):
        return None
    return _data_uri(buffer.getvalue())


# ---------------------------------------------------------------- sections


def _run_date(run: RunFolder, metrics: dict | None) -> str:
    for key in ("date", "finished_at", "started_at"):
        if (metrics or {}).get(key):
            return str(metrics[key])
    for path in (run.metrics, run.history, run.config):
        if path.is_file():
            return datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return "unknown date"


def _title(run: RunFolder, metrics: dict | None) -> str:
    m = metrics or {}
    model, mode = m.get("model", "unknown model"), m.get("mode", "unknown mode")
    params = ""
    if isinstance(m.get("trainable_params"), int) and isinstance(m.get("total_params"), int):
        params = f" · {m['trainable_params']:,} of {m['total_params']:,} parameters trainable"
    return (
        f"<h1>{_e(model)} — {_e(mode)}</h1>"
        f'<p class="sub">run <code>{_e(run.path.name)}</code> · {_e(_run_date(run, metrics))}{_e(params)}</p>'
    )


def _headline(metrics: dict | None, evaluation: dict | None, history: list[dict], search: dict | None = None) -> str:
    m, ev = metrics or {}, evaluation or {}
    # A searched run took the search's time; its final run (metrics.json's wall time) is the last part of it.
    wall = ("wall time (search)", search.get("wall_seconds")) if isinstance(search, Mapping) else \
        ("wall time", m.get("wall_seconds"))
    cards = [("best val accuracy", _pct(m.get("best_val_acc")))]
    if not history or plots.has_curve(history):  # a linear probe is fitted once: its only epoch is the best
        cards.append(("best epoch", _fmt(m.get("best_epoch")) if m.get("best_epoch") is not None else "n/a"))
    cards.append((wall[0], _duration(wall[1])))
    if evaluation is not None:
        cards += [
            ("accuracy", _pct(ev.get("accuracy"))),
            ("balanced accuracy", _pct(ev.get("balanced_accuracy"))),
            ("macro F1", _fmt(ev.get("macro_f1"), 3) if ev.get("macro_f1") is not None else "n/a"),
            ("ROC-AUC", _fmt(ev.get("roc_auc"), 3) if ev.get("roc_auc") is not None else "n/a"),
            ("ECE", _fmt(ev.get("ece"), 3) if ev.get("ece") is not None else "n/a"),
        ]
    html = "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>' for k, v in cards)
    note = "" if evaluation is not None else _na("evaluation: not available")
    split = f'<p class="sub">evaluated on split: {_e(ev["split"])}</p>' if ev.get("split") else ""
    return f'<h2>Headline</h2><div class="cards">{html}</div>{_val_accuracy_notes(m)}{split}{note}'


def _val_accuracy_notes(metrics: dict) -> str:
    """The best val accuracy's interval (results/metrics.py accuracy_interval), and whether the best epoch was
    chosen on val, where the run recorded them."""
    interval, html = metrics.get("best_val_acc_interval"), ""
    if isinstance(interval, Mapping):
        html += (f'<p class="sub">best val accuracy, {interval["confidence"]:.0%} interval: {_pct(interval["low"])} '
                 f'to {_pct(interval["high"])} on {interval["images"]} images (Wilson score interval: where this '
                 "model's accuracy on as many other images of the same kind would plausibly land)</p>")
    if metrics.get("best_chosen_on_val"):
        html += (f'<p class="sub">the best of {_e(metrics.get("epochs_run"))} epochs was chosen on the val images '
                 f'it is scored on, so its accuracy is optimistic; the last epoch scored '
                 f'{_pct(metrics.get("last_val_acc"))} (<code>--best-metric last</code> scores val once)</p>')
    return html


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        out: list[tuple[str, Any]] = []
        for key, sub in value.items():
            out += _flatten(sub, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, (list, tuple, Mapping)):
        return [(prefix, json.dumps(value, default=str))]
    return [(prefix, value)]


def _config(parsed: Any, raw: str | None, searched: bool = False) -> str:
    """The settings that differ from `transferkit train`'s defaults first (what a reader wants to know), every
    setting in a fold below. `searched`: the recipe search chose them; its final run is recorded as the
    reproduce command runs it, `--recipe tutorial` with the chosen pieces, which the table says."""
    if isinstance(parsed, Mapping):
        # Values as strings: the config is shown exactly as written, not rounded like metrics.
        rows = [(k, str(v)) for k, v in _flatten(parsed)]
        defaults = {k: str(v) for k, v in _flatten(_default_config())}
        changed = [(k, v) for k, v in rows if k not in defaults or defaults[k] != v]
        if searched:
            changed = [(k, "auto: the recipe search chose the settings in this table (section Search)"
                        if k == "recipe" else v) for k, v in changed]
        intro = "<p>Settings that differ from the defaults of <code>transferkit train</code>:</p>"
        return ("<h2>Config</h2>" + intro + _table(["key", "value"], changed)
                + f"<details><summary>all {len(rows)} settings (config.yaml)</summary>"
                + _table(["key", "value"], rows) + "</details>")
    if raw is not None:
        return f"<h2>Config</h2><pre>{_e(raw)}</pre>"
    return "<h2>Config</h2>" + _na()


def _default_config() -> dict:
    from transferkit.config import TrainConfig

    return TrainConfig(data="").to_dict()


def _problems(problems: Any) -> str:
    # Imported here: the data package would add 0.1-0.2 s to every import of the report.
    from transferkit.data.folders.problems import SILENT_KINDS

    if isinstance(problems, Mapping):
        problems = {kind: entries for kind, entries in problems.items() if kind not in SILENT_KINDS}
    if not isinstance(problems, Mapping) or not any(problems.values()):
        return "<p>No data problems found.</p>"
    parts = ["<h3>Problems</h3>"]
    for kind, entries in problems.items():
        if not entries or not isinstance(entries, list):
            continue
        items = []
        for entry in entries[:MAX_PROBLEM_FILES]:
            entry = entry if isinstance(entry, Mapping) else {"path": entry}
            detail = f" — {_e(entry['detail'])}" if entry.get("detail") else ""
            items.append(f"<li><code>{_e(entry.get('path', '?'))}</code>{detail}</li>")
        if len(entries) > MAX_PROBLEM_FILES:
            items.append(f"<li>… and {len(entries) - MAX_PROBLEM_FILES} more</li>")
        parts.append(
            f"<details><summary>{_e(kind)}: {len(entries)} file(s)</summary><ul>{''.join(items)}</ul></details>"
        )
    return "".join(parts)


def _data_summary(run: RunFolder, report: dict | None) -> str:
    if report is None:
        return "<h2>Data</h2>" + _na()
    counts = report.get("counts") if isinstance(report.get("counts"), Mapping) else {}
    splits = list(counts)
    classes = list(report.get("classes") or [])
    for split_counts in counts.values():  # classes seen in counts but not listed
        classes += [c for c in split_counts if c not in classes]
    rows = [[c, *(counts[s].get(c, 0) for s in splits), sum(counts[s].get(c, 0) for s in splits)] for c in classes]
    totals = [sum(counts[s].values()) for s in splits]
    rows.append(["total", *totals, sum(totals)])
    source = f"<p>Split source: {_e(report['split_source'])}</p>" if report.get("split_source") else ""
    batch = ""
    if run.batch_grid.is_file():
        batch = "<h3>A training batch, as training saw it</h3>" + _image(run.batch_grid, "training batch")
    table = _table(["class", *splits, "all"], rows) if splits else _na("class counts: not available")
    return f"<h2>Data</h2>{source}{table}{_problems(report.get('problems'))}{batch}"


def _curves(run: RunFolder, history: list[dict]) -> str:
    if history and not plots.has_curve(history):
        html = "<h2>Training curves</h2><p>One epoch: nothing to draw.</p>"
    else:
        html = "<h2>Training curves</h2>" + _image(run.curves, "training curves")
    if not history:
        return html + "<h3>History</h3>" + _na()
    columns = list(dict.fromkeys(k for row in history for k in row))
    rows = [[row.get(c) for c in columns] for row in history]
    return html + "<h3>History</h3>" + _table(columns, rows)


def _confusion(run: RunFolder, evaluation: dict | None) -> str:
    html = "<h2>Confusion matrix</h2>" + _image(run.confusion, "confusion matrix")
    per_class = (evaluation or {}).get("per_class")
    if not per_class:
        return html + _na("per-class metrics: not available")
    rows = [[r.get("class"), r.get("precision"), r.get("recall"), r.get("f1"), r.get("support")] for r in per_class]
    return html + _table(["class", "precision", "recall", "F1", "support"], rows)


def _top_losses(run: RunFolder, evaluation: dict | None) -> str:
    """Inline thumbnails with text captions when the images are readable, else top_losses.png."""
    head = "<h2>Top losses</h2>"
    figures = []
    for item in ((evaluation or {}).get("top_losses") or [])[:MAX_GALLERY_ITEMS]:
        uri = _thumbnail_uri(item.get("path"), (evaluation or {}).get("sixteen_bit_white", SIXTEEN_BIT_WHITE))
        if uri is None:
            continue
        prob = item.get("probability_of_predicted")
        caption = (
            f"{_e(item.get('true'))} / {_e(item.get('predicted'))} "
            f"p={_e(_fmt(prob, 2))} · loss {_e(_fmt(item.get('loss'), 2))}<br><code>{_e(item.get('path'))}</code>"
        )
        figures.append(f'<figure><img alt="{_e(item.get("path"))}" src="{uri}"><figcaption>{caption}</figcaption></figure>')
    if figures:
        return head + "<p>true / predicted, probability of the prediction</p>" + f'<div class="gallery">{"".join(figures)}</div>'
    if run.top_losses.is_file():
        return head + _image(run.top_losses, "top losses")
    return head + _na()


def _timing(metrics: dict | None, history: list[dict]) -> str:
    seconds = [row["seconds"] for row in history if isinstance(row.get("seconds"), (int, float))]
    rows = [["wall time", _duration((metrics or {}).get("wall_seconds"))], ["epochs", str(len(history))]]
    if seconds:
        rows += [
            ["training time (sum of epochs)", _duration(sum(seconds))],
            ["mean per epoch", _duration(sum(seconds) / len(seconds))],
            ["slowest epoch", _duration(max(seconds))],
        ]
    return "<h2>Timing</h2>" + _table(["", "value"], rows)


def _command(command: str) -> str:
    """A command line that wraps only at the spaces between its arguments (each one kept whole, so a flag is never
    cut at its hyphens), so all of it shows; a copy still gives one line."""
    words = " ".join(f"<span>{_e(word)}</span>" for word in command.split(" "))
    return f'<pre class="command">{words}</pre>'


def _images_compared_on(search: Mapping) -> str:
    """Where the candidates were compared on a subsample: on how many, and how many the final model got."""
    n = search.get("compared_on_images")
    if not n:
        return ""
    final = search.get("train_subsample")
    all_s, all_bytes = search.get("all_images_seconds_estimate"), search.get("all_images_memory_bytes_estimate")
    text = f" The candidates were compared on a random {n} of the training images; the final model was fitted on "
    if not final:
        return text + "all of them."
    if all_bytes:
        return text + (f"{final}, as many as the memory held; on all of them, the reproduce command without "
                       f"--train-subsample needs about {all_bytes / 1e9:.1f} GB of memory.")
    return text + f"{final}." + (f" On all of them, the reproduce command without --train-subsample takes about "
                                 f"{_duration(all_s)}." if all_s else "")


def _search(search: dict | None) -> str:
    """The recipe search (search/): every candidate, its inner score and time, why it stopped, the choice."""
    if not isinstance(search, Mapping) or not isinstance(search.get("candidates"), list):
        return ""
    rows = []
    for c in search["candidates"]:
        if not isinstance(c, Mapping):
            continue
        settings = {k: v for k, v in (c.get("settings") or {}).items() if k != "cv_per_C"}
        score = c.get("score")
        rows.append([("→ " if c.get("name") == search.get("chosen") else "") + str(c.get("name")),
                     "" if score is None else f"{score:.4f}",
                     "" if c.get("holdout") is None else f"{c['holdout']:.4f}",
                     _duration(c.get("estimate_s")),
                     "–" if str(c.get("status")).startswith("skipped") else _duration(c.get("seconds")),
                     str(c.get("status")),
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())])
    head = (f"<h2>Search</h2><p>Budget {_duration(search.get('budget_seconds'))}, used "
            f"{_duration(search.get('wall_seconds'))}. {_e(str(search.get('selection', '')))}. "
            f"Chosen: <b>{_e(str(search.get('chosen')))}</b>."
            + _images_compared_on(search)
            + (f" The ladder stopped early: {_e(str(search['stopped']))}." if search.get("stopped") else "")
            + " The same run without the search:</p>"
            f"{_command(str(search.get('reproduce', '')))}")
    from ..engine.scores import metric_words

    metric = metric_words(search["metric"]) if search.get("metric") else "score"  # older records: accuracy
    return head + _table(["candidate", f"CV / inner {metric}", "probe on inner hold-out", "estimate", "took",
                          "status", "settings"], rows)


def _environment(metrics: dict | None) -> str:
    env = (metrics or {}).get("environment")
    if not isinstance(env, Mapping) or not env:
        return "<h2>Environment</h2>" + _na()
    return "<h2>Environment</h2>" + _table(["", "value"], _flatten(env))


# ---------------------------------------------------------------- entry point


def _section(name: str, render, *args, **kwargs) -> str:
    """One section, or "not available" where a file it reads holds valid JSON of another shape than a run writes
    (edited by hand, or by another tool): the rest of the report still comes."""
    try:
        return render(*args, **kwargs)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        log.warning("report: section %s not available: a file of the run is damaged (%s: %s)", name,
                    type(exc).__name__, exc)
        return f"<h2>{_e(name)}</h2>" + _na("not available: a file of the run it is drawn from is damaged")


def write_report(run_dir: str | Path, announce: bool = True) -> Path:
    """Write RUN/report.html from whatever the run folder holds and return its path. announce=False: no
    log line (a report rewritten with more in it, already announced once)."""
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"run folder {run.path} does not exist; pass the folder a training run wrote")
    metrics = RunFolder.read_json(run.metrics)
    evaluation = RunFolder.read_json(run.evaluation)
    data_report = RunFolder.read_json(run.data_report)
    parsed_config, raw_config = _read_config(run.config)
    history = _read_history(run, metrics)
    classes = _classes(evaluation, metrics, data_report)
    _ensure_figures(run, history, evaluation, classes)

    title = f"{(metrics or {}).get('model', 'run')} — {run.path.name}"
    search = RunFolder.read_json(run.search)
    body = "".join(
        [
            _section("Run", _title, run, metrics),
            _section("Headline", _headline, metrics, evaluation, history, search),
            _section("Search", _search, search),  # an auto run's story: what was tried, and why this model
            _section("Config", _config, parsed_config, raw_config, searched=isinstance(search, Mapping)),
            _section("Data", _data_summary, run, data_report),
            _section("Training curves", _curves, run, history),
            _section("Confusion matrix", _confusion, run, evaluation),
            _section("Top losses", _top_losses, run, evaluation),
            _section("Timing", _timing, metrics, history),
            _section("Environment", _environment, metrics),
        ]
    )
    html = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}"
        f'<p class="sub">report written {_e(datetime.now().strftime("%Y-%m-%d %H:%M"))} by transferkit</p>'
        "</body></html>"
    )
    out = run.report
    atomic_write_text(out, html)  # a reader (a browser refreshing it, `serve`) never sees half a page
    (log.info if announce else log.debug)("wrote %s", out)
    return out

"""PNG figures for a run: learning curves, confusion matrix, image grids, run comparisons.

Each function writes one PNG, closes its figure (long training sessions call these every
run, and open figures leak memory) and returns the Path it wrote.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from ..preprocessing import SIXTEEN_BIT_WHITE  # noqa: E402
from ..run_folder import RunFolder  # noqa: E402

log = logging.getLogger(__name__)

DPI = 100
MIN_CELL_PX = 128  # the narrowest cell of an image mosaic: ~21 characters of its title
# Class names and paths are user text: a "$" in them must not start matplotlib mathtext,
# which would garble the label or raise a parse error.
_RC = {"text.parse_math": False} if "text.parse_math" in matplotlib.rcParams else {}


@contextmanager
def _drawing():
    """matplotlib's settings for user text, and quiet about characters its font lacks: a class named
    "bees 🐝" printed a UserWarning with plots.py's path in the middle of a run's output (the figure draws a box)."""
    with plt.rc_context(_RC), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        yield


def _save(fig: plt.Figure, path: str | Path) -> Path:
    try:
        with _drawing():
            return _write(path, lambda to: fig.savefig(to, dpi=DPI, format="png"))
    finally:
        plt.close(fig)


def _write(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    log.debug("wrote %s", path)
    return path


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for `key`, skipping epochs where it is missing or not a number."""
    xs, ys = [], []
    for i, row in enumerate(history):
        try:
            value = float(row[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isnan(value):
            continue
        try:
            epoch = float(row.get("epoch", i + 1))
        except (TypeError, ValueError):
            epoch = float(i + 1)
        xs.append(epoch)
        ys.append(value)
    return xs, ys


def has_curve(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a history is worth drawing: one epoch (a linear probe, fitted to convergence at once) is a
    single point, not a curve."""
    return len(history) > 1


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Two panels, loss and accuracy, with train and val lines against epoch."""
    with _drawing():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric in zip(axes, ("loss", "acc")):
            for split, style in (("train", "-o"), ("val", "-s")):
                xs, ys = _series(history, f"{split}_{metric}")
                if xs:
                    ax.plot(xs, ys, style, markersize=3, label=split)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5" ticks
            ax.set_ylabel("accuracy" if metric == "acc" else "loss")
            ax.set_title("accuracy" if metric == "acc" else "loss")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
    return _save(fig, path)


# Bidirectional embedding, override and isolate controls, shown as their code points in figures and reports: a class
# or file named "\u202eevil" was drawn "live", and one without its closing control turned the rest of its caption
# around ("a / b" read as "b / a").
BIDI_CONTROLS = {cp: f"[U+{cp:04X}]" for cp in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def _shorten(name: Any, limit: int = 20) -> str:
    """Long class names would squeeze the heatmap to nothing; the report has the full names."""
    text = str(name).translate(BIDI_CONTROLS)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _axis_labels(classes: Sequence[Any], limit: int = 20) -> list[str]:
    """The classes shortened (_shorten) for the heatmap's axes, each still told apart: names that share their first
    `limit` characters ("photos_of_category_1", "photos_of_category_2") keep their ends, else their number."""
    short = [_shorten(c, limit) for c in classes]
    head = (limit - 1) // 2
    labels = [label if short.count(label) == 1 else name[:head] + "…" + name[-(limit - 1 - head):]
              for name, label in zip((str(c).translate(BIDI_CONTROLS) for c in classes), short)]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{i}: {label}"
    return labels


def plot_confusion(cm: Any, classes: Sequence[str], path: str | Path, normalize: bool = True) -> Path:
    """Annotated heatmap, rows = true class; each cell shows its count and row percentage.

    With `normalize` the colour follows the row fraction, so a rare class's errors are as
    visible as a frequent one's; otherwise it follows raw counts.
    """
    counts = np.asarray(cm, dtype=np.float64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {n} classes")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    shown = fractions if normalize else counts

    side = min(max(4.0, 0.6 * n + 2.5), 20.0)
    with _drawing():
        fig, ax = plt.subplots(figsize=(side, side))
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        labels = _axis_labels(classes)
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        # A figure title stays centred and visible even when long labels squeeze the axes.
        fig.suptitle("confusion matrix" + (" (colour = row %)" if normalize else ""))
        if n <= 30:  # beyond that the annotations are unreadable anyway
            threshold = shown.max() / 2 if shown.max() > 0 else 0.5
            for i in range(n):
                for j in range(n):
                    colour = "white" if shown[i, j] > threshold else "black"
                    text = f"{int(counts[i, j])}\n{100 * fractions[i, j]:.0f}%"
                    ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
        fig.tight_layout()
    return _save(fig, path)


def _to_numpy(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch tensor, possibly on GPU or requiring grad
        images = images.detach().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def _denormalize(images: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, C, H, W) normalised batch -> (N, H, W, C) floats in [0, 1]."""
    batch = _to_numpy(images)
    if batch.ndim == 3:  # a single image
        batch = batch[None]
    if batch.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {batch.shape}")
    mean_ = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.clip(batch * std_ + mean_, 0.0, 1.0).transpose(0, 2, 3, 1)


def _fit_picture(picture: np.ndarray, cell_px: int) -> np.ndarray:
    """(H, W, C) floats in [0, 1] or uint8 -> uint8 RGB no larger than cell_px on either side."""
    if picture.dtype != np.uint8:
        picture = (np.clip(picture, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if picture.ndim == 2:
        picture = picture[..., None]
    if picture.shape[-1] == 1:
        picture = np.repeat(picture, 3, axis=-1)
    if max(picture.shape[:2]) > cell_px:
        image = Image.fromarray(picture)
        image.thumbnail((cell_px, cell_px))
        picture = np.asarray(image)
    return picture


def _mosaic(pictures: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, ncols: int,
            cell_px: int, empty_text: str = "") -> Path:
    """The pictures tiled into one image with a title above each, drawn and saved by Pillow. Through
    matplotlib (one axes per picture and tight_layout) a 16-image figure took 1-2 s on a 2-core CPU; one imshow
    and N texts still 0.2-0.25 s, a quarter of a small run's figures. Pillow: 0.1-0.15 s, most of it compressing
    the PNG."""
    from PIL import ImageDraw

    fitted = [_fit_picture(p, cell_px) for p in pictures]
    largest = max([1] + [max(p.shape[:2]) for p in fitted]) if fitted else cell_px
    # Small pictures (32-64 px data) made cells so narrow that a title kept ~8 characters: "ants / b…", the
    # prediction cut off. They are enlarged by whole pixels, and a cell is at least MIN_CELL_PX wide.
    zoom = max(1, min(cell_px, MIN_CELL_PX) // largest)
    if zoom > 1:
        fitted = [p.repeat(zoom, axis=0).repeat(zoom, axis=1) for p in fitted]
    cell_px = max(largest * zoom, min(cell_px, MIN_CELL_PX))  # no wider than the largest picture, or the minimum
    n = max(len(fitted), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    lines = max([1] + [str(t).count("\n") + 1 for t in titles])
    title_px, gap = 6 + 13 * lines, 6
    cell_w, cell_h = cell_px + gap, cell_px + title_px + gap
    canvas = np.full((nrows * cell_h, ncols * cell_w, 3), 255, dtype=np.uint8)
    spots = []
    for i, picture in enumerate(fitted):
        row, col = divmod(i, ncols)
        h, w = picture.shape[:2]
        top = row * cell_h + title_px + (cell_px - h) // 2
        left = col * cell_w + gap // 2 + (cell_px - w) // 2
        canvas[top:top + h, left:left + w] = picture
        spots.append((col * cell_w + cell_w / 2, row * cell_h + title_px / 2))
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), _title_font()
    max_chars = max(8, cell_px // 6)  # ~5.5 px per character at 11 px: keep a title over its own picture
    for spot, title in zip(spots, titles):
        text = "\n".join(_fit_line(draw, font, line, max_chars, cell_w - 2) for line in str(title).split("\n"))
        draw.multiline_text(spot, text, fill="black", font=font, anchor="mm", align="center", spacing=2)
    if not fitted and empty_text:
        draw.text((canvas.shape[1] / 2, canvas.shape[0] / 2), empty_text, fill="black", font=font, anchor="mm")
    return _write(path, lambda to: image.save(to, format="png"))


def _fit_line(draw, font, line: str, max_chars: int, width_px: int) -> str:
    """`line` shortened (_shorten) to at most max_chars, then until it is drawn no wider than width_px: wide
    letters ("LLLL…", "WWWW…") ran over the neighbouring titles."""
    text = _shorten(line, max_chars)
    while max_chars > 2 and draw.textlength(text, font=font) > width_px:
        max_chars -= 1
        text = _shorten(line, max_chars)
    return text


def _title_font():
    """The other figures' face, matplotlib's DejaVu Sans (shipped in its data folder), at its 8 pt: 11 px at DPI 100."""
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 11)


def plot_image_grid(
    images: Any,
    titles: Sequence[str],
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    ncols: int = 8,
) -> Path:
    """Show a normalised batch (e.g. a training batch) with one title per image."""
    pictures = _denormalize(images, mean, std)
    return _mosaic(list(pictures), [str(t) for t in titles], path, ncols, cell_px=200)


def _load_thumbnail(path: Any, size: int, sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> np.ndarray | None:
    """RGB thumbnail of an image file, or None when it cannot be read."""
    from ..data.images import load_thumbnail
    from ..errors import DataError

    try:
        return np.asarray(load_thumbnail(path, size, sixteen_bit_white))
    except (DataError, OSError, ValueError, TypeError) as exc:  # missing, truncated, not an image
        log.warning("top losses: skipping unreadable image %s (%s)", path, exc)
        return None


def plot_top_losses(items: Sequence[Mapping[str, Any]], path: str | Path, image_size: int = 160,
                    sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> Path:
    """Gallery of the worst-predicted images, titled "true / pred" over "p=0.93" (of the prediction);
    16-bit grey images read with the run's white (Preprocessing.sixteen_bit_white)."""
    pictures, titles = [], []
    for item in items:
        picture = _load_thumbnail(item.get("path"), image_size, sixteen_bit_white)
        if picture is not None:
            probability = float(item.get("probability_of_predicted", float("nan")))
            pictures.append(picture)
            titles.append(f"{item.get('true')} / {item.get('predicted')}\np={probability:.2f}")
    return _mosaic(pictures, titles, path, ncols=4, cell_px=max(image_size, 160),
                   empty_text="no readable images")


def plot_compare(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    ylabel: str = "validation accuracy",
    title: str | None = None,
) -> Path:
    """One line per run against epoch (1-based), e.g. pretrained vs from scratch."""
    with _drawing():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, values in curves.items():
            ys = [float(v) for v in values]
            ax.plot(range(1, len(ys) + 1), ys, "-o", markersize=3, label=str(name))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title if title is not None else f"{ylabel} per epoch")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend()
        fig.tight_layout()
    return _save(fig, path)


def plot_evaluation(evaluation: Mapping[str, Any], classes: Sequence[str], folder: str | Path,
                    top_losses: int = 16) -> None:
    """The figures of an evaluation (classification_metrics' output): confusion.png and, when it lists
    mistakes with their paths, top_losses.png."""
    folder = RunFolder(folder)
    plot_confusion(evaluation["confusion_matrix"], classes, folder.confusion)
    if evaluation.get("top_losses"):
        plot_top_losses(evaluation["top_losses"][:top_losses], folder.top_losses,
                        sixteen_bit_white=evaluation.get("sixteen_bit_white", SIXTEEN_BIT_WHITE))

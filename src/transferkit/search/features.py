"""The training images' features for the probes: extracted in chunks in a seeded random order while the time
left allows, kept per crop, input size and view so each is computed once per search."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np

from . import costs, ladder, state
from .state import Context, Search

log = logging.getLogger(__name__)


def _with_pixel_features(search: Search, ctx: Context, crop, views, x: np.ndarray) -> np.ndarray:
    """x (n, views, d) with the pixel block of the same images and views appended (engine/probe.py PixelBlock),
    kept beside the taps' features (ctx.feats) so each crop and view is read once. A pass of its own: the
    pixel block is tried on small images only, whose decoding is cheap (digits: 0.9 s for 1,347 images), and it
    keeps the taps' cached vector the same for every run."""
    from ..engine.probe_train import make_pixel_taps

    have = ctx.feats.setdefault((crop, "pixels"), {})
    todo = [v for v in views if v not in have]  # after the first extraction: any subsample is already made
    if todo:
        taps = make_pixel_taps(ctx.spec, ctx.cfg, ctx.pre(crop), ctx.device)
        got, ok, _ = taps.features([p for p, _ in ctx.scan.train], todo, ctx.scan.digests, ctx.decode_threads,
                                   desc="search pixels")
        _all_read(got, ok)
        have.update({v: got[:, i] for i, v in enumerate(todo)})
    return np.concatenate([x, np.stack([have[v] for v in views], 1)], 2)


def _all_read(x, ok) -> None:
    """The search needs every training image: one unreadable file ends it with a pointer to the run that lists it."""
    from ..errors import DataError

    if x is None or not all(ok):
        raise DataError("some training images could not be read during the search; run `transferkit train "
                        "--recipe tutorial` to see which (or remove them)")


def probe_features(search: Search, ctx: Context, crop, views, reserve: float) -> np.ndarray | None:
    """The training features a probe on these views reads (with the pixel block where the probes try it), or
    None where their extraction had to stop."""
    x = train_features(search, ctx, crop, views, reserve)
    if x is not None and ladder.tries_pixels(search, ctx):
        x = _with_pixel_features(search, ctx, crop, views, x)
    return x


def train_features(search: Search, ctx: Context, crop, views, reserve: float, size=None) -> np.ndarray | None:
    """(n, views, d) features of the training images, extracted in chunks (a random order) while the
    projected end of the extraction leaves `reserve` seconds; None where it had to stop. The first probe
    never stops: it keeps the chunks done in time and the search goes on with that subsample."""
    have = ctx.feats.setdefault((crop, size), {})
    todo = costs.missing_views(ctx, crop, views, size)
    if todo:
        first = not search.feats_done
        got = _extract_chunks(search, ctx, ctx.taps_for(crop, size), todo, reserve, keep_partial=first,
                              cost=ctx.cost * costs.pixel_ratio(ctx, size))
        if got is None:
            return None
        if first and len(got[todo[0]]) < len(ctx.scan.train):
            keep_subsample(search, ctx, len(got[todo[0]]))
        have.update(got)
        search.feats_done = True
    return np.stack([have[v] for v in views], 1)


def _extract_chunks(search: Search, ctx: Context, taps, todo, reserve: float, keep_partial: bool, cost: float = 1.0):
    """`cost`: seconds per view of this extraction against one of the first backbone at its own size (the
    views search.rate counts)."""
    paths = [ctx.scan.train[i][0] for i in ctx.order]
    size = max(128, -(-len(paths) // 8))
    parts, t0 = [], time.perf_counter()
    for start in range(0, len(paths), size):
        if parts:  # project from the rate seen so far (a busy machine, a new decode)
            search.rate = start * len(todo) * cost / max(time.perf_counter() - t0, 1e-3)
            # The first probe goes on while the next chunk and a CV on the images so far fit (a 100-class
            # folder at 60 s: all or the first chunk stopped at 250 of 2,000 images, CV 0.36); the others
            # run on every image or not at all.
            end = min(len(paths), start + size) if keep_partial else len(paths)
            ahead = (end - start) * len(todo) * cost / search.rate
            if ahead + costs.cv_seconds(search, ctx, len(todo), end) + reserve > search.left():
                if not keep_partial:
                    return None
                break
        chunk = paths[start:start + size]
        x, ok, _ = taps.features(chunk, todo, ctx.scan.digests, ctx.decode_threads, "search features")
        _all_read(x, ok)
        parts.append(x)
    x = np.concatenate(parts)
    inverse = np.argsort(ctx.order[: len(x)])  # back to the scan's order (of the images done)
    return {v: x[inverse, i] for i, v in enumerate(todo)}


def keep_subsample(search: Search, ctx: Context, n: int, asked: bool = False) -> None:
    """Only the first n training images in the search's random order (data/folders/scan.py subsample_order): the
    budget allowed features of no more, or the caller asked for n (--train-subsample, or the comparison
    subsample of a large folder, which says so itself). The search and the final run go on
    with those, and the reproduce command names n: `transferkit train --train-subsample n` keeps the same
    images, since the search's order stays that of one seeded permutation of all of them."""
    keep = np.sort(ctx.order[:n])  # positions in the current list
    if not asked:
        log.warning("search: the budget allows the first probe features of %d of %d training images; it is scored "
                    "on that random subsample, then fitted on as many as the time left pays for (a larger "
                    "--time-budget uses them all)", n, len(ctx.scan.train))
    rank = np.empty(len(ctx.order), dtype=np.int64)
    rank[ctx.order] = np.arange(len(ctx.order))
    ctx.scan = copy.copy(ctx.scan)
    ctx.scan.train = [ctx.scan.train[i] for i in keep]
    ctx.y = ctx.y[keep]
    ctx.order = np.argsort(rank[keep])  # the same order, over the images kept
    ctx.inner = state.inner_split(ctx.y, ctx.cfg.seed)
    search.subsample = n
    search.starved = search.starved or not asked

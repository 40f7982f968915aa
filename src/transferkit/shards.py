"""Shard files of the on-disk caches (engine/features.py's FeatureStore, data/decoded.py's DecodedStore):
how a shard is made visible, and how a damaged or foreign one is found and dropped.

A shard is a data file plus a json index entry (`shard-<id>.json`) that names what the data holds, its
size in bytes and a checksum taken when it was written. The json is written first and the data renamed
into place second, both atomically, so:
- json without data: a write in progress in another process (or one that was interrupted): skipped;
- data without json: the index was lost, since no writer ever leaves data before its json: damaged;
- a readable json whose data has another size, or whose checksum differs when read: damaged.
Readers list the data files before the json files, so a shard that lands between the two listings is
never mistaken for one without an index. Damaged shards are deleted (their entries are then missing and
recomputed by the caller) and reported in one warning line per cache and run. Shards never change once
written, so deleting a damaged one cannot race with a writer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 3  # shard index entries without this format number are foreign (older releases, other tools)


def list_shards(root: Path, data_suffix: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """(index entry by shard name for every complete shard, [(shard, why) for damaged ones])."""
    data = {p.name[: -len(data_suffix)]: p for p in root.glob(f"shard-*{data_suffix}")}  # before the jsons
    entries, damaged, indexed = {}, [], set()
    for meta_path in sorted(root.glob("shard-*.json")):
        name = meta_path.stem
        indexed.add(name)
        meta = _read_entry(meta_path, root.name)
        if isinstance(meta, str):
            damaged.append((name, meta))
        elif name in data:
            size = _size(data[name])
            if size != meta["bytes"]:
                damaged.append((name, f"{size} bytes, {meta['bytes']} written"))
            else:
                entries[name] = meta
    damaged += [(name, "index entry missing") for name in sorted(set(data) - indexed)]
    return entries, damaged


def new_entry(root: Path, nbytes: int, **content) -> dict:
    """The json index entry of a shard of `nbytes` bytes in the cache folder `root`."""
    return {"format": FORMAT, "store": root.name, "bytes": nbytes, **content}


def _read_entry(path: Path, store: str) -> dict | str:
    """The entry, or why it cannot be trusted."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable index entry ({type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("store") != store:
        return "foreign index entry"
    if not isinstance(meta.get("bytes"), int):
        return "index entry without a size"
    return meta


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def drop(root: Path, name: str, data_suffix: str) -> None:
    """Delete a damaged shard (data first: a json without data reads as a write in progress)."""
    for path in (root / f"{name}{data_suffix}", root / f"{name}.json"):
        try:
            os.unlink(path)
        except FileNotFoundError:  # another run dropped it first
            pass
        except OSError as exc:  # a read-only cache: the shard stays out of this run's index all the same
            log.debug("could not delete %s: %s", path, exc)


def warn_dropped(what: str, root: Path, damaged: list[tuple[str, str]]) -> None:
    """The one warning line for the shards of one cache that a run found damaged and dropped."""
    if not damaged:
        return
    listed = "; ".join(f"{name}: {why}" for name, why in damaged[:3])
    more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
    log.warning("%s %s: %d damaged shard(s) dropped (%s%s); what they held is recomputed",
                what, root, len(damaged), listed, more)

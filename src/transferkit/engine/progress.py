"""Progress bars on stderr that stay quiet when stderr is not a terminal (CI logs stay readable)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def _quiet() -> bool:
    return not sys.stderr.isatty() or os.environ.get("TRANSFERKIT_QUIET") == "1"


def progress(iterable, desc: str = "", total: int | None = None, leave: bool = False):
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_quiet(), file=sys.stderr,
                dynamic_ncols=True)


def time_bar(seconds: float, desc: str = ""):
    """A bar over a time budget; the caller sets `.n` to the seconds used and calls `.refresh()`."""
    return tqdm(total=round(seconds), desc=desc, unit="s", leave=False, disable=_quiet(), file=sys.stderr,
                dynamic_ncols=True, bar_format="{desc}: {bar} {n:.0f}/{total:.0f}s")

"""Progress bars on stderr that stay quiet when stderr is not a terminal (CI logs stay readable), except in a
Jupyter notebook, which draws them."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def _quiet() -> bool:
    if os.environ.get("TRANSFERKIT_QUIET") == "1":
        return True
    return not (sys.stderr.isatty() or _in_notebook())


def _in_notebook() -> bool:
    """A Jupyter kernel: its stderr is no terminal, yet it draws bars (tqdm.auto picks its notebook ones)."""
    return "ipykernel" in sys.modules


def progress(iterable, desc: str = "", total: int | None = None, leave: bool = False):
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_quiet(), file=sys.stderr,
                dynamic_ncols=True)


def time_bar(seconds: float, desc: str = ""):
    """A bar over a time budget; the caller sets `.n` to the seconds used and calls `.refresh()`."""
    return tqdm(total=round(seconds), desc=desc, unit="s", leave=False, disable=_quiet(), file=sys.stderr,
                dynamic_ncols=True, bar_format="{desc}: {bar} {n:.0f}/{total:.0f}s")

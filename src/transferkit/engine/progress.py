"""Progress bars on stderr that stay quiet when stderr is not a terminal (CI logs stay readable)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable, desc: str = "", total: int | None = None, leave: bool = False):
    quiet = not sys.stderr.isatty() or os.environ.get("TRANSFERKIT_QUIET") == "1"
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=quiet, file=sys.stderr,
                dynamic_ncols=True)

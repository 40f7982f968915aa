"""`python -m transferkit.engine.launcher ARGS`: torchrun (torch.distributed.run) with ARGS, as `--nproc` starts it,
without torchrun's tracebacks: a stop signal ends it with exit code 128 + signal (torchrun stops its workers, which
finish the batch, keep `last` and say how to resume, then raises SignalException), and a worker that failed with
its one-line error ends it with that worker's exit code (torchrun raised ChildFailedError: exit code 1 after a
traceback and a failure report, for `--resume` of a finished run as for a data folder of one class)."""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # the first worker to fail has said why (errors print on every rank)
        code = exc.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # -15: killed by SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several processes, one run: PyTorch's own distributed engine (torch.distributed, DDP,
DistributedSampler) under torchrun, on one machine or several.

Everything here is a no-op in a single process, so the train loop calls it unconditionally:
- `session(fit)` joins the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK
  (gloo on CPU, nccl on CUDA, with a timeout) and leaves it at the end;
- image training wraps the model in DistributedDataParallel and reads one DistributedSampler shard per
  rank; validation predictions are gathered from every rank and the sampler's padding dropped by
  index, so the metrics equal the single-process ones;
- feature extraction is sharded over ranks into the shared FeatureStore (uniquely named shard files),
  then the head trains on the cache on rank 0 alone while the other ranks finish;
- only rank 0 writes run files; every rank stops together (non-finite loss, early stopping).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import TrainingError, UsageError
from . import signals

log = logging.getLogger(__name__)

TIMEOUT_ENV = "TRANSFERKIT_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0
COMM_FAILURE_MARKERS = ("gloo/transport", "timed out waiting", "connection closed by peer",
                        "connection reset by peer", "nccl error", "watchdog caught collective")
# While the head trains on cached features on rank 0 alone, the loop runs as a single process.
_detached = False


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> "Launch":
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        world = int(env["WORLD_SIZE"])
        return cls(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", world)))


def launched() -> bool:
    """True in a process started by torchrun with more than one process in the job."""
    return Launch.from_env().world_size > 1


def active() -> bool:
    """True while the ranks work together (collectives are needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not _detached


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else Launch.from_env().rank


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of minutes, not {raw!r}") from None
    return timedelta(minutes=minutes)


def backend_for(device_name: str) -> str:
    wants_cuda = device_name != "cpu" and torch.cuda.is_available()
    return "nccl" if wants_cuda else "gloo"


def check_gpu_count(processes: int, device_name: str) -> None:
    """One process per GPU on a CUDA job: more processes than GPUs is a user's mistake, said in one line
    (NCCL refuses two ranks on one GPU, and cuda:N past the last GPU is an opaque CUDA error)."""
    gpus = torch.cuda.device_count()
    if backend_for(device_name) != "nccl" or processes <= gpus:
        return
    raise UsageError(f"{processes} processes on CUDA need {processes} GPUs, and this machine has {gpus}: use "
                     f"--nproc {gpus}, or --device cpu for CPU processes")


def init(device_name: str = "auto") -> bool:
    """Join torchrun's process group (if launched by it and not joined yet); True if this call joined."""
    global _detached
    launch = Launch.from_env()
    if launch.world_size <= 1 or dist.is_initialized():
        return False
    backend = backend_for(device_name)
    check_gpu_count(launch.local_world_size, device_name)
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    # torchrun sets OMP_NUM_THREADS=1; share the cores of this machine between its ranks instead.
    threads = int(os.environ.get("TRANSFERKIT_THREADS_PER_RANK", 0)) or \
        max(1, (os.cpu_count() or 1) // launch.local_world_size)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, timeout=timeout())
    _detached = False
    log.info("rank %d of %d (%s backend, %d threads per rank)", launch.rank, launch.world_size, backend, threads)
    return True


def shutdown() -> None:
    global _detached
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _detached = False


def session(fit):
    """Decorator for fit(cfg): run it inside the process group torchrun describes, and turn a lost or
    timed-out peer into one clear TrainingError instead of a hang or a backend traceback."""

    @functools.wraps(fit)
    def wrapper(cfg, *args, **kwargs):
        joined = init(cfg.device)
        try:
            return fit(cfg, *args, **kwargs)
        except RuntimeError as exc:
            if not _lost_peer(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            minutes = timeout().total_seconds() / 60
            raise TrainingError(
                f"rank {rank()}: lost contact with the other processes ({first}); another rank probably "
                f"failed (see its message) or stalled longer than {TIMEOUT_ENV}={minutes:g} minutes"
                f"{signals.resume_hint()}"  # a rank killed (the OOM killer): the run goes on from `last`
            ) from None
        finally:
            if joined:
                shutdown()

    return wrapper


def _lost_peer(exc: RuntimeError) -> bool:
    # gloo reports a timeout or a vanished peer as a plain RuntimeError naming its transport.
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(m in text for m in COMM_FAILURE_MARKERS)


def device_for(device: torch.device) -> torch.device:
    """Each rank of a CUDA job gets the GPU numbered by its LOCAL_RANK."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", Launch.from_env().local_rank)
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def share_from_main(make):
    """`make()` on rank 0, its result sent to every rank (one scan of the data, one run folder name)."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flag: bool) -> bool:
    """True only if `flag` holds on every rank: one rank's non-finite loss stops them all."""
    if not active():
        return bool(flag)
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0


def main_decides(flag: bool) -> bool:
    """Rank 0's decision (e.g. early stopping) on every rank, so no rank leaves the loop alone."""
    return bool(share_from_main(lambda: bool(flag)))


def sum_across(*values: float) -> tuple[float, ...]:
    """Element-wise sums over ranks (train loss, correct, seen)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_eval(probs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, losses: torch.Tensor):
    """Every rank's val predictions, merged: sorted by sample index, the sampler's padding (a repeat of
    the first samples) dropped, so metrics equal those of one process. Numpy arrays out."""
    parts = [(probs.numpy(), labels.numpy(), indices.numpy(), losses.numpy())]
    if active():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (probs.numpy(), labels.numpy(), indices.numpy(), losses.numpy()))
    p, y, idx, loss = (np.concatenate([part[k] for part in parts]) for k in range(4))
    _, first = np.unique(idx, return_index=True)  # sorted unique indices, first occurrence of each
    return p[first], y[first], idx[first], loss[first]


def sharded_loaders(train_ds, val_ds, cfg, common: dict, worker_init_fn, generator, model):
    """DataLoaders reading this rank's shard: train reshuffled per epoch (set_epoch), val in order
    (DistributedSampler pads it by repeating the first samples; gather_eval drops them). A shard's last batch of
    one image is left out where `model` has BatchNorm layers (sources.drops_a_lone_image)."""
    from .sources import drops_a_lone_image

    if cfg.balanced_sampler:
        raise UsageError("--balanced-sampler is not supported with several processes yet; "
                         "use --class-weights auto instead")
    r, n = dist.get_rank(), dist.get_world_size()
    train_sampler = DistributedSampler(train_ds, num_replicas=n, rank=r, shuffle=True, seed=cfg.seed)
    val_sampler = DistributedSampler(val_ds, num_replicas=n, rank=r, shuffle=False)
    drop_last = drops_a_lone_image(len(train_sampler), cfg.batch_size, model)  # every rank's shard is as long
    train = DataLoader(train_ds, cfg.batch_size, sampler=train_sampler, generator=generator, drop_last=drop_last,
                       worker_init_fn=worker_init_fn, **common)
    val = DataLoader(val_ds, cfg.batch_size, sampler=val_sampler, **common)
    return train, val


def set_epoch(loader, epoch: int) -> None:
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


def wrap_model(model: torch.nn.Module, device: torch.device, spec) -> torch.nn.Module:
    """DistributedDataParallel over the trainable parameters (frozen ones are not synchronised)."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    # inception's auxiliary head is skipped in some passes; other backbones use every trainable weight.
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(spec.aux_head))


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if not active():
        return
    with torch.inference_mode(False), torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def scaled(cfg):
    """The config the optimizer sees: with --scale-lr linear, lr × the number of data-parallel ranks
    (the global batch grew by that factor). config.yaml keeps the lr as given."""
    n = world_size()
    if cfg.scale_lr == "linear" and n > 1:
        log.info("--scale-lr linear: lr %g × %d ranks = %g", cfg.lr, n, cfg.lr * n)
        return replace(cfg, lr=cfg.lr * n)
    return cfg


class Sharding:
    """Splits the (image, view) items missing from a FeatureStore between ranks, then makes every
    rank see every rank's shards. Store shards are uniquely named files, so writers never collide."""

    def take(self, todo: list) -> list:
        # Every rank built its store index before this barrier, so all computed the same todo list.
        barrier()
        return todo[rank()::world_size()]

    def sync(self, store) -> None:
        barrier()
        store.refresh()


def sharding() -> Sharding | None:
    return Sharding() if active() else None


def leave_training_to_main(source) -> bool:
    """After sharded extraction, the head trains on cached features on rank 0 alone (it is tiny).
    True on the other ranks, which then end; rank 0 carries on as a single process."""
    global _detached
    if not active() or getattr(source, "data_parallel", False):
        return False
    _detached = True
    return not is_main()


def worker_result(state) -> dict:
    """What fit returns on a rank that writes nothing."""
    return {"rank": rank(), "run_dir": str(state.out), "written": False}


def launch(cmd: list[str]) -> int:
    """Run the torchrun job of `--nproc` and return its exit code (128 + signal where a signal stopped it).
    SIGINT/SIGTERM/SIGHUP sent to this process are passed on to torchrun, which stops its workers as a signal
    stops one process (batch finished, `last` kept). Before, a SIGTERM to this process (kill PID, a scheduler)
    ended it alone and the workers trained on unseen; and Ctrl-C made subprocess.call SIGKILL torchrun before it
    could stop them. torchrun gets its own session so that a terminal's Ctrl-C reaches it once, through here."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        proc.send_signal(signum)

    names = ("SIGINT", "SIGTERM", "SIGHUP")
    previous = {s: signal.signal(s, forward) for s in (getattr(signal, n) for n in names if hasattr(signal, n))}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received and code != 0 else code


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`transferkit ... --nproc N` as a single-node torchrun job (a free port is picked by --standalone),
    without --nproc, which torchrun's own parser would take for its --nproc-per-node."""
    if nproc < 1:
        raise UsageError(f"--nproc must be ≥ 1, not {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    return [sys.executable, "-m", "transferkit.engine.launcher", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "transferkit", *rest]

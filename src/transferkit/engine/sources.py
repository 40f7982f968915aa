"""Where batches come from. The loop in fit.py does not care whether it trains the head on cached
features or the network on decoded images; each source knows which modules train and how to run them."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from ..data.dataset import ImageListDataset, skip_broken_collate
from ..data.decoded import DecodedDataset, decode_missing, open_store
from ..errors import DataError
from ..io import RunFolderError
from ..models.batchnorm import Folding, freeze_statistics
from ..data.folders import file_sha256
from . import distributed
from . import precision as precisions
from ..caches import feature_root
from .features import View, cached_features, default_workers, one_thread, store_for
from .runtime import FrozenEngine, FrozenPart

log = logging.getLogger(__name__)


class BatchSource:
    """Interface: prepare(), train_batches(epoch), val_batches(), forward(x), modes, bookkeeping."""

    def __init__(self, state):
        self.state = state
        self.train_items = list(state.scan.train)
        self.val_items = list(state.scan.val)
        self._skipped = 0
        self._folding = None

    def prepare(self) -> None: ...

    def _after_mode_switch(self, module: nn.Module) -> None:
        """--batchnorm frozen keeps BN on its statistics in training too; every BN in eval mode then runs
        folded into its conv (models/batchnorm.py: same outputs, less work)."""
        if self.state.cfg.batchnorm == "frozen":
            freeze_statistics(module)
        if self._folding is None:
            self._folding = Folding(module)
        self._folding.fold()

    def finish(self) -> None:
        """After the last epoch: the model's modules run their own forward again (predict, export)."""
        if self._folding is not None:
            self._folding.unfold()

    def compute_threads(self):
        """The context the epochs run in: all of torch's threads, unless the source knows better."""
        return nullcontext()

    def take_skipped(self) -> int:
        n, self._skipped = self._skipped, 0
        return n

    def describe(self) -> dict:
        return {"kind": type(self).__name__}

    def head_inputs(self):
        """(train, val) inputs of the classifier head (eval view) where this source has them at no cost,
        for the novelty reference (novelty.py); None elsewhere."""
        return None

    def _balanced_weights(self, labels: list[int]) -> np.ndarray:
        counts = np.bincount(labels, minlength=len(self.state.scan.classes))
        return 1.0 / np.maximum(counts[labels], 1)


def weights_source(spec, weights_file: str | None, pretrained: bool, seed: int) -> str:
    """What the backbone's weights are, for cache keys."""
    if weights_file:
        return f"file:{file_sha256(weights_file)}"
    if pretrained:
        return f"pretrained:{spec.weights.url or spec.weights.package}"
    return f"scratch:seed{seed}"  # random weights differ by seed


def feature_identity(spec, preprocessing: dict, weights_file: str | None, pretrained: bool, seed: int) -> dict:
    """What the cached features of a feature-extract run depend on (features.store_for keys on it)."""
    return {"model": spec.name, "weights": weights_source(spec, weights_file, pretrained, seed),
            "preprocessing": preprocessing, "point": spec.cache_point}


class CachedFeatureSource(BatchSource):
    """feature-extract: the frozen network runs once per (image, view); epochs train the head only."""

    def prepare(self) -> None:
        st = self.state
        self.head = st.model.get_submodule(st.spec.cache_point)
        views = [View(k, st.cfg.view_kind, st.cfg.seed) for k in range(st.cfg.views)]
        store = store_for(self._identity())
        extractor = self._extractor(store)
        workers = _workers(st, len(self.train_items))
        common = dict(workers=workers, sharding=distributed.sharding(), digests=st.scan.digests)
        train_x, train_ok, s1 = cached_features(extractor, store, [p for p, _ in self.train_items], views,
                                                st.pre, desc="train features", **common)
        val_x, val_ok, s2 = cached_features(extractor, store, [p for p, _ in self.val_items], views[:1],
                                            st.pre, desc="val features", **common)
        if train_x is None or val_x is None:
            raise DataError("no image could be read during feature extraction")
        self._skipped += train_ok.count(False) + val_ok.count(False)
        self.train_items = [it for it, ok in zip(self.train_items, train_ok) if ok]
        self.val_items = [it for it, ok in zip(self.val_items, val_ok) if ok]
        self.train_x, self.val_x = train_x, val_x[:, 0]
        self.train_y = torch.tensor([y for _, y in self.train_items])
        self.val_y = torch.tensor([y for _, y in self.val_items])
        self.stats = {"train": s1, "val": s2, "views": len(views), "feature_shape": list(train_x.shape[2:]),
                      **extractor.info}
        log.info("features: %d cached, %d computed in %.1fs", s1["hits"] + s2["hits"],
                 s1["computed"] + s2["computed"], s1["seconds"] + s2["seconds"])

    def _extractor(self, store) -> FrozenEngine:
        # The network up to the cache point, on ONNX Runtime when usable (engine/runtime.py).
        st = self.state
        frozen = FrozenPart(st.model, st.spec.cache_point)
        return FrozenEngine(frozen, st.device, st.cfg.engine, store.onnx_path, st.cfg.channels_last,
                            precision=st.cfg.precision)

    def _identity(self) -> dict:
        st = self.state
        return feature_identity(st.spec, st.pre.to_dict(), st.cfg.weights, st.cfg.pretrained, st.cfg.seed)

    def trainable_module(self) -> nn.Module:
        return self.head

    def compute_threads(self):
        # The head on cached features is a few small matrix products per batch: one thread does them in
        # milliseconds, while two wait on each other whenever anything else holds a core (2-core EPYC
        # beside other jobs: a 1280→2 head, 244 images, 7-15 ms per epoch on one thread, 430-1240 ms on two).
        return one_thread()

    def steps_per_epoch(self) -> int:
        return (self._images_per_epoch() + self.state.cfg.batch_size - 1) // self.state.cfg.batch_size

    def _images_per_epoch(self) -> int:
        n = len(self.train_items)
        return n - 1 if drops_a_lone_image(n, self.state.cfg.batch_size, self.head) else n

    def set_train_mode(self) -> None:
        self.head.train()
        self._after_mode_switch(self.head)

    def set_eval_mode(self) -> None:
        self.head.eval()
        self._after_mode_switch(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).flatten(1)

    def train_batches(self, epoch: int):
        cfg, n = self.state.cfg, len(self.train_items)
        # Each epoch sees every image once, through one of its cached views picked at random:
        # the cached equivalent of on-the-fly augmentation.
        rng = np.random.default_rng(cfg.seed * 100003 + epoch)
        if cfg.balanced_sampler:
            w = self._balanced_weights(self.train_y.tolist())
            order = rng.choice(n, size=n, replace=True, p=w / w.sum())
        else:
            order = rng.permutation(n)
        view = rng.integers(0, self.train_x.shape[1], size=n)
        for start in range(0, self._images_per_epoch(), cfg.batch_size):
            idx = torch.from_numpy(order[start:start + cfg.batch_size])
            v = torch.from_numpy(view[start:start + cfg.batch_size])
            yield self.train_x[idx, v].to(self.state.device), self.train_y[idx].to(self.state.device)

    def val_batches(self):
        bs = max(256, self.state.cfg.batch_size)
        for start in range(0, len(self.val_items), bs):
            idx = torch.arange(start, min(start + bs, len(self.val_items)))
            yield self.val_x[idx].to(self.state.device), self.val_y[idx].to(self.state.device), idx

    def describe(self) -> dict:
        return {"kind": "cached-features", **self.stats}

    def head_inputs(self):
        return self.train_x[:, 0], self.val_x


class ImageBatchSource(BatchSource):
    """Decoded image batches through the network (finetune, partial, or feature-extract without cache)."""

    def __init__(self, state, train_tf, eval_tf):
        super().__init__(state)
        self.train_tf, self.eval_tf = train_tf, eval_tf
        self.cuda = state.device.type == "cuda"
        self.precision = precisions.resolve(state.cfg.precision, state.device)
        self.decode_stats = None

    def prepare(self) -> None:
        cfg = self.state.cfg
        store = self._decoded_store() if cfg.decoded_cache else None
        workers = _workers(self.state, len(self.train_items), decoded=store is not None)
        common = dict(num_workers=workers, collate_fn=skip_broken_collate, pin_memory=self.cuda,
                      persistent_workers=workers > 0)
        # Re-seeded per epoch in train_batches, so a resumed run shuffles exactly as an uninterrupted one.
        self.generator = generator = torch.Generator().manual_seed(cfg.seed)
        train_ds = self._dataset(self.train_items, self.train_tf, store)
        drop_last = drops_a_lone_image(len(train_ds), cfg.batch_size, self.state.model)
        if cfg.balanced_sampler:
            w = self._balanced_weights([y for _, y in self.train_items])
            sampler = WeightedRandomSampler(torch.as_tensor(w), len(w), generator=generator)
            self.train_loader = DataLoader(train_ds, cfg.batch_size, sampler=sampler, drop_last=drop_last,
                                           worker_init_fn=_seed_worker, **common)
        else:
            self.train_loader = DataLoader(train_ds, cfg.batch_size, shuffle=True, generator=generator,
                                           drop_last=drop_last, worker_init_fn=_seed_worker, **common)
        self.val_loader = DataLoader(self._dataset(self.val_items, self.eval_tf, store), cfg.batch_size, **common)
        self.data_parallel = distributed.active()
        if self.data_parallel:  # torchrun: each rank reads its shard, DDP averages the gradients
            self.train_loader, self.val_loader = distributed.sharded_loaders(
                train_ds, self.val_loader.dataset, cfg, common, _seed_worker, generator, self.state.model)
        self.net = distributed.wrap_model(self.state.model, self.state.device, self.state.spec)

    def _decoded_store(self):
        """Decode every image once into the decoded-image store (data/decoded.py); images that cannot
        be decoded are dropped and counted as skipped. None where the cache folder cannot be written."""
        st = self.state
        paths = [p for p, _ in self.train_items + self.val_items]
        workers = _workers(st, len(paths))
        try:
            store = open_store(feature_root(), st.pre)
            keys, self.decode_stats = decode_missing(store, paths, st.scan.digests, st.pre, workers=workers,
                                                     sharding=distributed.sharding())
        except (OSError, RunFolderError) as exc:  # a full or read-only cache folder costs speed, not the run
            log.warning("decoded-image cache not used (%s); images are decoded every epoch", exc)
            return None
        self.keys = dict(zip(paths, keys))
        self._skipped += self.decode_stats["failed"]
        self.train_items = [it for it in self.train_items if self.keys[it[0]] is not None]
        self.val_items = [it for it in self.val_items if self.keys[it[0]] is not None]
        if not self.train_items or not self.val_items:
            raise DataError("no image could be decoded in the train or val split")
        return store

    def _dataset(self, items, transform, store):
        if store is None:
            return ImageListDataset(items, transform, shorter_side=self.state.pre.resize_size,
                                    sixteen_bit_white=self.state.pre.sixteen_bit_white)
        return DecodedDataset(items, [self.keys[p] for p, _ in items], store, transform)

    def trainable_module(self) -> nn.Module:
        return self.state.model

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def set_train_mode(self) -> None:
        st = self.state
        st.mode.set_train_mode(st.model, st.spec)  # what the run's mode trains (modes/)
        self._after_mode_switch(st.model)

    def set_eval_mode(self) -> None:
        self.state.model.eval()
        # BatchNorm statistics drift apart per rank during an epoch; evaluate (and save) rank 0's.
        distributed.sync_buffers(self.state.model)
        self._after_mode_switch(self.state.model)

    def forward(self, x: torch.Tensor):
        if self.state.device.type == "cpu" and self.state.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precisions.training_autocast(self.state.device, self.precision):  # weights stay fp32
            # DDP only where gradients flow; evaluation needs no synchronisation.
            out = (self.net if torch.is_grad_enabled() else self.state.model)(x)
        if isinstance(out, tuple):  # inception's (logits, aux_logits) while training
            return tuple(o.float() for o in out[:2])
        return out.float()

    def _batches(self, loader, with_index: bool):
        dev = self.state.device
        for batch, skipped in loader_batches(loader, dev):
            self._skipped += skipped
            if batch is None:
                continue
            x, y, idx = batch
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            yield (x, y, idx) if with_index else (x, y)

    def train_batches(self, epoch: int):
        self.generator.manual_seed(self.state.cfg.seed * 100003 + epoch)
        distributed.set_epoch(self.train_loader, epoch)
        return self._batches(self.train_loader, with_index=False)

    def val_batches(self):
        return self._batches(self.val_loader, with_index=True)

    def describe(self) -> dict:
        return {"kind": "image-batches", "workers": self.train_loader.num_workers,
                "decoded_cache": self.decode_stats, "precision": self.precision}


def drops_a_lone_image(n: int, batch_size: int, module: nn.Module) -> bool:
    """Whether an epoch of n training images leaves out its last batch: where that batch would hold one image
    and `module`, the part that trains, has BatchNorm layers. BatchNorm in training mode cannot normalize a
    single image on a 1×1 map ("Expected more than 1 value per channel when training" ended such runs:
    inception_v3's auxiliary head at its own 299 px, any backbone's top at --image-size 32). The order is
    reshuffled every epoch, so the image left out is another one each time."""
    return n > batch_size and n % batch_size == 1 and \
        any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _workers(state, n_images: int, decoded: bool = False) -> int:
    """Decoding threads or loader processes for a run: --workers where given, else _auto_workers."""
    if state.cfg.workers is not None:
        return state.cfg.workers
    return _auto_workers(n_images, decoded=decoded, cpu=state.device.type == "cpu")


def _auto_workers(n_images: int, decoded: bool = False, cpu: bool = False) -> int:
    # Worker start-up costs more than it saves on tiny folders.
    if n_images < 200:
        return 0
    if decoded and cpu:
        # From the decoded-image store a crop costs ~1.5 ms (~700 images/s in this process), against
        # ~80 ms per image for a CPU training step. A worker process would hide that 2%, but it competes
        # with the model's threads for the cores: a 2-epoch lite0 finetune on 244 + 153 images took
        # 50-52 s of epochs with one worker, 46-47 s with none (2-core CPU, RESULTS.md notes3).
        return 0
    return default_workers(accelerator=not cpu)  # decoding files, or feeding an accelerator


def loader_batches(loader: DataLoader, device: torch.device):
    """The loader's batches. On a CPU without workers each batch is made on one intra-op thread
    (features.one_thread): the transforms' tensor ops would otherwise use all of the model's threads, and
    when anything else shares the cores those threads wait on each other (crops from the decoded store
    fell from ~680 to ~160 images/s beside one busy process, 2-core CPU)."""
    if loader.num_workers or device.type != "cpu":
        yield from loader
        return
    batches = iter(loader)
    while True:
        with one_thread():
            batch = next(batches, _END)
        if batch is _END:
            return
        yield batch


_END = object()


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)

"""A dataset over (path, label) pairs that survives files breaking after the scan."""

from __future__ import annotations

import logging

from torch.utils.data import Dataset, default_collate

from .images import SIXTEEN_BIT_WHITE, load_rgb

log = logging.getLogger(__name__)


class ImageListDataset(Dataset):
    """Items are (path, label). A file that cannot be read any more (deleted or truncated after the
    scan) yields None; `skip_broken_collate` drops it and the loop counts it."""

    def __init__(self, items, transform, view_transform=None, shorter_side: int | None = None,
                 sixteen_bit_white: int = SIXTEEN_BIT_WHITE):
        self.items = list(items)
        self.transform = transform
        self.view_transform = view_transform  # optional fn(tensor, index) applied after transform
        self.shorter_side = shorter_side  # the preprocessing's resize size: large JPEGs may decode smaller
        self.sixteen_bit_white = sixteen_bit_white

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            image = load_rgb(path, shorter_side=self.shorter_side, sixteen_bit_white=self.sixteen_bit_white)
        except Exception as exc:  # noqa: BLE001 - any failure of one file must not end the run
            log.warning("skipping %s during training: %s", path, exc)
            return None
        x = self.transform(image)
        if self.view_transform is not None:
            x = self.view_transform(x, index)
        return x, label, index


def skip_broken_collate(batch):
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, skipped
    return default_collate(good), skipped

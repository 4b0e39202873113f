"""attncache pipeline: the cache side (data, augment, teacher, encodings, store, precompute), the training side
(train), and the tools and studies above them; the rooms and their one-way imports: README.md, "Layout".

The names below are the API for a training loop of your own (README.md, "Use the cache from your own loop";
examples/own_loop.py): open a cache, stream a rank's batches of (image, target, teacher factors), decode the
factors to teacher attention on the device, and install the transfer into a timm ViT with its loss.

They are resolved on first use (PEP 562 `__getattr__`): importing any module of the package runs this
file first, and a cache-side import (a Ray teacher actor, `attncache verify`) must not load the
training side with it.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "CacheStore": "attncache.pipeline.store.cache",
    "StreamConfig": "attncache.pipeline.train.loader", "cache_stream": "attncache.pipeline.train.loader",
    "epoch_loader": "attncache.pipeline.train.loader",
    "infer_num_classes": "attncache.pipeline.train.session", "open_checked": "attncache.pipeline.train.session",
    "CacheSignal": "attncache.pipeline.train.signals", "SignalGeometry": "attncache.pipeline.train.signals",
    "check_fit": "attncache.pipeline.train.signals",
    "Geometry": "attncache.pipeline.train.student", "get_mode": "attncache.pipeline.train.student",
    "install_transfer": "attncache.pipeline.train.student", "transfer_loss": "attncache.pipeline.train.student",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'attncache.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

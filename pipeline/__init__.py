"""attncache pipeline: the cache side (data, augment, teacher, encodings, store, precompute), the training side
(train), and the tools and studies above them; the rooms and their one-way imports: README.md, "Layout".

The names below are the API for a training loop of your own (README.md, "Use the cache from your own loop";
examples/own_loop.py): open a cache, stream a rank's batches of (image, target, teacher factors), decode the
factors to teacher attention on the device, and install the transfer into a timm ViT with its loss.
"""
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.train.loader import StreamConfig, cache_stream, epoch_loader
from attncache.pipeline.train.session import infer_num_classes, open_checked
from attncache.pipeline.train.signals import CacheSignal, SignalGeometry, check_fit
from attncache.pipeline.train.student import Geometry, get_mode, install_transfer, transfer_loss

__all__ = ["CacheSignal", "CacheStore", "Geometry", "SignalGeometry", "StreamConfig", "cache_stream", "check_fit",
           "epoch_loader", "get_mode", "infer_num_classes", "install_transfer", "open_checked", "transfer_loss"]

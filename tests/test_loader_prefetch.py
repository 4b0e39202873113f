"""How the training loader reads a unit from the store: each shard file fetched once, checked against
its marker and decoded from those same bytes (pipeline/store/unit_read.py), the next unit's objects
fetched while the current one is consumed (pipeline/train/prefetch.py), and batches bit for bit the
same either way."""
from collections import Counter

import numpy as np
import pytest

from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.train.loader import _unit_from_cache

from test_loader import _precompute


@pytest.fixture(scope="module")
def cache(synth_data, tmp_path_factory):
    return _precompute((synth_data["train"],), tmp_path_factory.mktemp("prefetch") / "c.zarr")


def counting(store: CacheStore, monkeypatch) -> Counter:
    """Every read and size query the store's file layer answers, by (method, path)."""
    calls: Counter = Counter()
    for method in ("read", "size", "is_file"):
        real = getattr(store.files, method)

        def counted(rel, _real=real, _method=method):
            calls[_method, rel] += 1
            return _real(rel)

        monkeypatch.setattr(store.files, method, counted)
    return calls


def test_a_unit_read_fetches_each_shard_file_once_and_decodes_what_zarr_decodes(cache, monkeypatch):
    reader = CacheStore.open(cache.path)
    reader.metadata_sha256(1)  # the view's array docs: read once per store, not per unit
    calls = counting(reader, monkeypatch)
    data, marker = _unit_from_cache(reader, 2, 1)
    files = reader.unit_files(1, 2)
    assert sorted(calls) == sorted([("read", reader.marker_path(1, 2))] + [("read", rel) for rel in files])
    assert set(calls.values()) == {1}
    assert set(marker["files"]) == set(files)
    want = cache.read_unit(1, 2)
    for name in ("keys", "labels", "valid", "aug"):
        got, ref = getattr(data, name), getattr(want, name)
        assert got.dtype == ref.dtype and np.array_equal(got, ref), name
    assert data.factors.keys() == want.factors.keys() and len(data.factors) >= 2
    for name, ref in want.factors.items():
        assert data.factors[name].dtype == ref.dtype and data.factors[name].tobytes() == ref.tobytes(), name


def _stream(store, **kw):
    from test_loader import _stream as stream

    return stream(store, **kw)


def _batches(stream, workers, epoch=0, batch_size=48):
    from attncache.pipeline.train.loader import epoch_loader

    return list(epoch_loader(stream, epoch, batch_size, workers))


def _same(a, b) -> bool:
    import torch

    return (len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
        and torch.equal(x["label"], y["label"]) and x["factors"].keys() == y["factors"].keys()
        and all(torch.equal(x["factors"][n], y["factors"][n]) for n in x["factors"]) for x, y in zip(a, b)))


def test_batches_are_bit_for_bit_the_same_with_and_without_prefetch(cache):
    without = _batches(_stream(cache, prefetch=False), workers=0, epoch=1)
    assert len(without) == 11 and without[0]["factors"]
    assert _same(_batches(_stream(cache), workers=0, epoch=1), without)
    assert _same(_batches(_stream(cache), workers=2, epoch=1), without)


def prefetch_threads() -> list:
    import threading

    from attncache.pipeline.train.prefetch import THREAD_NAME

    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def test_the_next_units_objects_are_fetched_before_the_current_units_last_batch(cache, monkeypatch):
    """One unit per window (no shuffle) and 128 samples per unit: while the consumer still holds
    unit 0's last batch back, unit 1's marker and shard files are fetched on the prefetch thread.
    Without prefetch nothing of unit 1 is read until unit 0 is used up."""
    import threading
    import time

    from attncache.pipeline._util.files import Files
    from attncache.pipeline.train.loader import epoch_loader
    from attncache.pipeline.train.loader_order import rank_units

    reads = []
    real = Files.read

    def logged(self, rel):
        reads.append((rel, threading.current_thread().name))
        return real(self, rel)

    monkeypatch.setattr(Files, "read", logged)
    first, second = rank_units(4, 0, 7, 0, 1)[:2]
    wanted = {cache.marker_path(0, second), *cache.unit_files(0, second)}

    def seen() -> set:
        return {rel for rel, _ in reads if rel in wanted}

    for prefetch in (True, False):
        reads.clear()
        batches = iter(epoch_loader(_stream(cache, shuffle_buffer=1, prefetch=prefetch), 0, 32, 0))
        held = [next(batches) for _ in range(3)]  # unit 0's first three of four batches
        deadline = time.time() + 60
        while prefetch and seen() != wanted and time.time() < deadline:
            time.sleep(0.05)
        if prefetch:
            assert seen() == wanted
            assert {name for rel, name in reads if rel in wanted} == {"attncache-prefetch"}
        else:
            assert seen() == set()
        last = next(batches)
        assert sum(len(b["key"]) for b in held + [last]) == 128  # unit 0, whole
        batches.close()  # what an error or Ctrl-C in the consumer does to the generator
        assert prefetch_threads() == []


def test_a_corrupt_next_unit_fails_when_it_is_consumed_with_the_same_message(cache, tmp_path):
    import shutil

    from attncache.pipeline.train.loader import CacheCorrupt, epoch_loader
    from attncache.pipeline.train.loader_order import rank_units

    copy = tmp_path / "c.zarr"
    shutil.copytree(cache.path, copy)
    broken = CacheStore.open(copy)
    second = rank_units(4, 0, 7, 0, 1)[1]
    rel = broken.unit_files(0, second)[-1]
    path = copy / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    messages = {}
    for prefetch in (True, False):
        got = []
        with pytest.raises(CacheCorrupt) as err:
            for batch in epoch_loader(_stream(broken, shuffle_buffer=1, prefetch=prefetch), 0, 32, 0):
                got.append(batch)
        assert len(got) == 4  # unit 0 whole, then the error when unit 1 is used
        messages[prefetch] = str(err.value)
        assert prefetch_threads() == []
    assert messages[True] == messages[False] and f"checksum mismatch in {rel}" in messages[True]

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

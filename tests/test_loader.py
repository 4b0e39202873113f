"""The streaming loader: every sample exactly once per epoch over ranks, the same batches for any
number of loader workers, views by epoch, the tar/cache join on `__key__`, and replay of the stored
augmentation."""
import io
from collections import Counter

import numpy as np
import pytest
import torch

from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.shards import DataError, decode_sample, iter_shard, shard_writer
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.teacher.model import TeacherConfig
from attncache.pipeline.train.loader import (CacheCorrupt, StreamConfig, epoch_loader, epoch_order, match_shards,
    steps_in_epoch)
from attncache.pipeline.train.loader_order import rank_units

from conftest import TINY_TEACHER

TEACHER = TeacherConfig(TINY_TEACHER["model"], tuple(sorted(TINY_TEACHER["model_args"].items())), random_init=True)


def _precompute(data, out, views=2, recipe="train"):
    run_precompute(PrecomputeConfig(data=data, out=str(out), teacher=TEACHER, views=views, recipe=recipe,
                                    encoding="lowrank:r=4:int8", layers=":", batch_size=64, workers=0, threads=2, progress=False))
    return CacheStore.open(out)


@pytest.fixture(scope="module")
def train_cache(synth_data, tmp_path_factory):
    """The 512-sample train split (4 shards of 128) cached over 2 views."""
    return _precompute((synth_data["train"],), tmp_path_factory.mktemp("loader") / "c.zarr")


def _stream(store, **kw):
    args = dict(shards=tuple(s["url"] for s in store.meta["dataset"]["shards"]),
                recipe_json=tuple(store.meta["recipe"]["ops"]), num_classes=4, cache=store.path, seed=7,
                views=store.meta["views"], shuffle_buffer=32)
    args.update(kw)
    return StreamConfig(**args)


def _keys(stream, epoch, workers, rank=0, world=1, batch_size=50):
    keys = []
    for batch in epoch_loader(stream, epoch, batch_size, workers, rank, world):
        keys += batch["key"]
    return keys


def test_rank_units_are_a_partition_for_every_world_size():
    order = epoch_order(11, epoch=3, seed=5)
    assert sorted(order) == list(range(11))
    for world in (1, 2, 3, 4):
        got = [u for r in range(world) for u in rank_units(11, 3, 5, r, world)]
        assert sorted(got) == list(range(11))


def _batches(stream, epoch, workers, rank=0, world=1, batch_size=50):
    return [batch["key"] for batch in epoch_loader(stream, epoch, batch_size, workers, rank, world)]


@pytest.mark.parametrize("world", [1, 2])
def test_batches_are_the_same_for_0_1_2_3_loader_workers(train_cache, world):
    """The keys of every batch, in order, for each rank: a function of (seed, epoch, world size,
    batch size) only. 30ef699 split the units over the workers and let each worker batch its own."""
    stream = _stream(train_cache, shuffle_buffer=64, interleave=3)
    for epoch in (1,):
        for rank in range(world):
            seen = {w: _batches(stream, epoch, w, rank, world, batch_size=48) for w in (0, 1, 2, 3)}
            assert seen[1] == seen[0] and seen[2] == seen[0] and seen[3] == seen[0], (epoch, rank)
            assert all(len(b) == 48 for b in seen[0][:-1])  # only the rank's last batch is short


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch(train_cache, world, workers):
    stream = _stream(train_cache)
    for epoch in (0, 1):
        keys = []
        for rank in range(world):
            keys += _keys(stream, epoch, workers, rank, world)
        counts = Counter(keys)
        assert len(counts) == 512 and set(counts.values()) == {1}, (world, workers, epoch)


def test_steps_in_epoch_is_what_the_loader_yields(train_cache):
    stream = _stream(train_cache)
    for world, workers, batch in ((1, 2, 50), (2, 3, 64), (2, 1, 100), (3, 0, 50)):
        expected = steps_in_epoch([128] * 4, 0, 7, world, batch)
        got = max(len(list(epoch_loader(stream, 0, batch, workers, r, world))) for r in range(world))
        assert got == expected


def test_the_order_is_seeded_by_seed_and_epoch_and_independent_of_timing(train_cache):
    stream = _stream(train_cache)
    first = _keys(stream, 0, workers=2)
    assert first == _keys(stream, 0, workers=2)  # same seed, same epoch: the same batches
    assert first != _keys(stream, 2, workers=2)  # another epoch: another unit order and shuffle
    assert first != _keys(_stream(train_cache, seed=8), 0, workers=2)
    assert sorted(first) == sorted(_keys(stream, 2, workers=2))


def test_batches_draw_from_many_units_and_a_resume_position_names_the_same_batches(train_cache):
    """Each batch mixes the units of its window; skipping k batches (what resume does) leaves the
    later batches as they were."""
    stream = _stream(train_cache, shuffle_buffer=2, interleave=4)
    batches = _batches(stream, 0, 0, batch_size=32)
    shard_of = {}
    for i, url in enumerate(stream.shards):
        shard_of.update({e.key: i for e in iter_shard(url)})
    assert all(len({shard_of[k] for k in b}) >= 3 for b in batches), [sorted({shard_of[k] for k in b}) for b in batches]
    loader = iter(epoch_loader(stream, 0, 32, 2))
    for _ in range(5):
        next(loader)
    assert [b["key"] for b in loader] == batches[5:]


def test_shuffle_buffer_mixes_units_and_size_one_keeps_tar_order(train_cache):
    unshuffled = _keys(_stream(train_cache, shuffle_buffer=1), 0, workers=1)
    # tar order inside each unit: keys ascend within each run of 128
    for start in range(0, 512, 128):
        run = unshuffled[start:start + 128]
        assert run == sorted(run)
    shuffled = _keys(_stream(train_cache, shuffle_buffer=64), 0, workers=1)
    assert shuffled != unshuffled and sorted(shuffled) == sorted(unshuffled)


def test_epoch_e_reads_view_e_mod_v_and_replays_its_augmentation(train_cache, synth_data):
    stream = _stream(train_cache, shuffle_buffer=1)
    recipe = Recipe.from_json(train_cache.meta["recipe"]["ops"])
    by_epoch = {}
    for epoch in (0, 1, 2):
        batch = next(iter(epoch_loader(stream, epoch, 8, 0)))
        shard = epoch_order(4, epoch, 7)[0]
        by_epoch[epoch] = (batch, shard)
        view = epoch % 2
        unit = train_cache.read_unit(view, shard)
        url = stream.shards[shard]
        entries = list(iter_shard(url))[:8]
        assert batch["key"] == [e.key for e in entries]
        for i, entry in enumerate(entries):
            expected = recipe.apply(unit.aug[entry.position], decode_sample(url, entry)[0])
            assert torch.equal(batch["image"][i], expected)
            assert np.array_equal(batch["factors"]["a"][i].numpy(), unit.factors["a"][entry.position])
    # epochs 0 and 2 share view 0 (same pixels per key, in another order); epoch 1 is view 1
    pixels = {e: {k: img for b in epoch_loader(stream, e, 128, 0) for k, img in zip(b["key"], b["image"])}
              for e in (0, 1, 2)}
    assert all(torch.equal(pixels[0][k], pixels[2][k]) for k in pixels[0])
    assert sum(not torch.equal(pixels[0][k], pixels[1][k]) for k in pixels[0]) > 500
    assert [b[0]["key"] for b in by_epoch.values()] != [by_epoch[0][0]["key"]] * 3


def test_a_shard_whose_keys_changed_since_precompute_is_an_error_naming_both_keys(synth_data, tmp_path):
    from attncache.pipeline.data.shards import expand_shards

    source = expand_shards(synth_data["val"])[0]
    data = tmp_path / "d"
    data.mkdir()
    entries = list(iter_shard(source))[:6]
    with shard_writer(data / "s-000000.tar") as sink:
        for e in entries:
            sink.write({"__key__": e.key, **e.members})
    store = _precompute((str(data / "s-000000.tar"),), tmp_path / "c.zarr", views=1)
    with shard_writer(data / "s-000000.tar") as sink:  # same file, third key renamed
        for i, e in enumerate(entries):
            sink.write({"__key__": "renamed" if i == 2 else e.key, **e.members})
    stream = StreamConfig((str(data / "s-000000.tar"),), tuple(store.meta["recipe"]["ops"]), 4, store.path, 0, 1)
    with pytest.raises(DataError, match=f"s-000000.tar.*'renamed'.*{entries[2].key}"):
        list(epoch_loader(stream, 0, 4, 0))


def test_a_corrupted_unit_is_refused_at_read_time(synth_data, tmp_path):
    store = _precompute((synth_data["val"],), tmp_path / "c.zarr", views=1)
    marker = store.read_marker(0, 0)
    rel = sorted(r for r in marker["files"] if "/factors/a" in r)[0]
    path = tmp_path / "c.zarr" / rel
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    stream = StreamConfig(match_shards(store, (synth_data["val"],)), tuple(store.meta["recipe"]["ops"]), 4,
                          store.path, 0, 1)
    with pytest.raises(CacheCorrupt, match="checksum mismatch"):
        list(epoch_loader(stream, 0, 4, 0))


def test_data_that_does_not_match_the_cache_names_the_shards(train_cache, synth_data):
    with pytest.raises(DataError, match="in the cache but not in --data"):
        match_shards(train_cache, (synth_data["train"].replace("000003", "000002"),))
    with pytest.raises(DataError, match="in --data but not in the cache.*val-000000"):
        match_shards(train_cache, (synth_data["train"], synth_data["val"]))


def test_without_a_cache_views_are_drawn_per_epoch_like_precompute(train_cache, synth_data):
    """No cache: epoch e draws view e from (seed, key, view), exactly what precompute would store."""
    recipe = Recipe.from_json(train_cache.meta["recipe"]["ops"])
    seed = train_cache.meta["seed"]
    stream = StreamConfig(match_shards(train_cache, (synth_data["train"],)), tuple(recipe.to_json()), 4, None, seed,
                          None, shuffle_buffer=1, with_factors=False)
    for epoch in (0, 1):
        batch = next(iter(epoch_loader(stream, epoch, 4, 0)))
        shard = epoch_order(4, epoch, seed)[0]
        cached = next(iter(epoch_loader(_stream(train_cache, seed=seed, shuffle_buffer=1), epoch, 4, 0)))
        assert batch["key"] == cached["key"]
        assert torch.equal(batch["image"], cached["image"]), f"epoch {epoch} shard {shard}"
        assert batch["factors"] == {}

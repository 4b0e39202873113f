"""The order of an epoch's samples, decided before any worker starts: a pure function of (seed, epoch,
rank, world size) and the units' sample counts, never of the loader's worker count or timing.

An epoch is a list of units (input shard, view): the shards in an order drawn from (seed, epoch).
Rank r takes units r, r + R, ... of that order (a disjoint share; ranks may get different sample
counts, hence different batch counts: the training loop lets a rank that ran out take part with
empty batches). A rank's units, in order, are grouped into *windows* of at least `interleave`
units holding at least `min_samples` samples; the samples of a window are permuted with a generator
seeded by (seed, epoch, rank, window), and the windows' permuted samples, one after the other, are
cut into batches of `batch_size` (a batch may straddle two windows; only the rank's last batch is
short). So every batch draws from up to `interleave` units however the shards were sorted (class-
ordered shards give batches of many classes), memory stays bounded by a window, and a position in
the epoch names the same batch on any machine: resume skips batches without changing later ones.

Loader workers only decode whole units (see `pipeline/train/loader.py`); the main process assembles the
batches in this order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_INTERLEAVE = 16


def epoch_order(num_shards: int, epoch: int, seed: int) -> list[int]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xE90C]))
    return [int(i) for i in rng.permutation(num_shards)]


def rank_units(num_shards: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """The shard indices one rank reads in an epoch, in the order it reads them."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return epoch_order(num_shards, epoch, seed)[rank::world]


def view_of(epoch: int, views: int | None) -> int:
    return epoch if views is None else epoch % views


def window_full(units: int, samples: int, interleave: int, min_samples: int) -> bool:
    """Whether a window of `units` units holding `samples` samples closes (the rank's last window
    closes with its units whatever it holds). Decided from counts alone, so the reader can close a
    window as soon as its units arrived."""
    return units >= max(1, interleave) and samples >= min_samples


def window_permutation(size: int, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    """The order of one window's samples (given in unit order, tar order within a unit)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, window, 0xB0F]))
    return rng.permutation(size)


def rank_samples(counts: Sequence[int], units: Sequence[int]) -> int:
    return sum(counts[u] for u in units)


def rank_batches(counts: Sequence[int], epoch: int, seed: int, rank: int, world: int, batch_size: int) -> int:
    """Batches one rank yields in an epoch: its samples cut into batches, only the last one short."""
    return -(-rank_samples(counts, rank_units(len(counts), epoch, seed, rank, world)) // batch_size)


def steps_in_epoch(counts: Sequence[int], epoch: int, seed: int, world: int, batch_size: int) -> int:
    """Steps of an epoch: the most batches any rank has (the others take part with empty batches).
    `counts` are usable samples per shard; without a cache they are the tar's samples, bad ones
    included (known only once decoded), so the figure is then an upper bound."""
    return max(rank_batches(counts, epoch, seed, r, world, batch_size) for r in range(world))

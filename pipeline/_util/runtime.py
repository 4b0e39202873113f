"""Settings of the machine a run uses, decided in one place."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of handing every large block back
    to the kernel; returns whether the setting is in effect (glibc only; elsewhere nothing changes).

    Why: a teacher forward or a low-rank fit allocates tensors of tens of MB per batch, each above
    glibc's mmap threshold, so every one is a fresh mapping whose pages fault in on first touch and
    is unmapped on free. Measured on the 2-core machine (BENCHMARKS.md, "Low-rank fitter"): the
    ViT-S forward of a batch of 32 ran 1.3x faster with the blocks kept, the subspace fit 1.2x. The
    process keeps its peak heap instead of shrinking between batches; precompute, train and the
    benchmarks reach that peak on every batch anyway. Forked loader workers inherit the setting."""
    global _kept
    if _kept:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
                 and mallopt(_M_TOP_PAD, 64 << 20))
    return _kept


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextmanager
def one_cpu_thread(device) -> Iterator[None]:
    """Run the enclosed CPU work on one intra-op thread, then restore the caller's count.

    For batched LAPACK on many small matrices (the low-rank fitter's d x d Cholesky, eigh and
    triangular solves): MKL threads each tiny call and its threads spin between calls, so any other
    busy thread (our own writer and decoder threads, or another process) makes it crawl. Measured
    (BENCHMARKS.md, "Low-rank fitter: one LAPACK thread"): a batched float64 eigh of 64 x 64
    matrices took 4,664 ms at 2 threads against 150 ms at 1 under a load of 4 on 2 cores, and 1 thread
    is as fast or faster on a quiet machine. Each matrix's LAPACK call is the same sequential code at
    either count, so results are bit-identical (tests/test_fitter.py). CUDA work is left alone."""
    if getattr(device, "type", str(device)) != "cpu":
        yield
        return
    before = _torch().get_num_threads()
    if before == 1:
        yield
        return
    _torch().set_num_threads(1)
    try:
        yield
    finally:
        _torch().set_num_threads(before)


def _torch():
    import torch  # here, not at the top: this module is imported by commands that never load torch

    return torch

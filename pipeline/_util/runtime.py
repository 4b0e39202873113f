"""Settings of the machine a run uses, decided in one place."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


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

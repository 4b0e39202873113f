"""Top-r singular pairs of the d x d low-rank core by block subspace iteration: a candidate for
`fit.fit_factors(top_singular=...)`, measured against the full eigh in BENCHMARKS.md ("Low-rank
fitter"). No store uses it: it is kept so the measurement can be rerun.

The start block is fixed (a Gaussian d x l block from a generator seeded here, never the global RNG),
the iteration count is fixed, and every step is a batched matmul, a batched Householder QR or a small
eigh per matrix, so the result is a pure function of the core. With l = 2r columns it solves an l x l
eigenproblem instead of a d x d one; where l would reach d it falls back to the full eigh.
"""
from __future__ import annotations

import torch

from attncache.pipeline.encodings.fit import _top_singular

ITERATIONS = 2  # power steps of core core^T after the first product
START_SEED = 0


def top_singular_subspace(core: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `fit._top_singular`: top-`rank` left singular vectors (descending) and values, zero-padded
    past d, in float64."""
    d = core.shape[-1]
    r = min(rank, d)
    width = 2 * r
    if width >= d:
        return _top_singular(core, rank)
    start = torch.randn(d, width, generator=torch.Generator().manual_seed(START_SEED), dtype=torch.float64)
    gram = core @ core.transpose(-1, -2)  # (d, d)
    block = gram @ start.to(device=core.device, dtype=core.dtype)
    for _ in range(ITERATIONS):
        block = gram @ torch.linalg.qr(block).Q
    basis = torch.linalg.qr(block).Q  # (d, width), orthonormal
    evals, evecs = torch.linalg.eigh(basis.transpose(-1, -2) @ gram @ basis)  # Rayleigh-Ritz, ascending
    top = basis @ torch.flip(evecs[..., -r:], dims=(-1,))
    sing = torch.flip(evals[..., -r:], dims=(-1,)).clamp_min(0).sqrt()
    if r < rank:
        top = torch.nn.functional.pad(top, (0, rank - r))
        sing = torch.nn.functional.pad(sing, (0, rank - r))
    return top, sing

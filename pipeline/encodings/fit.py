"""The best rank-r fit of scale * Q (K - mean_tokens K)^T as A B^T, A and B of shape (N, r).

Centring K removes a per-row constant from the logits, which softmax ignores, and shrinks the dynamic
range that a quantised row codec must cover. Q and centred K are whitened (Cholesky of their Gram
matrices, standing in for QR), the top-r singular pairs of the small d x d core are taken, and sqrt(S)
is split to both sides so A and B have similar ranges.
"""
from __future__ import annotations

from typing import Callable

import torch

from attncache.pipeline._util.runtime import one_cpu_thread
from attncache.pipeline.encodings.finite import NonFiniteValues, first_bad, require_finite


def _cholesky_upper(gram: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of Gram matrices with a small ridge, raised where float32 rounding
    left a rank-deficient Gram matrix (N < d, centred K) slightly indefinite."""
    gram = gram.double()
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)  # the ridges are fractions of it

    def ridged(g: torch.Tensor, t: torch.Tensor, ridge: float) -> torch.Tensor:
        # g + ridge * trace * I, written on the diagonal alone: the same values as the full-matrix sum
        # (off the diagonal x + 0.0 == x) for a fifth of the time of building trace * I
        out = g.clone()
        out.diagonal(dim1=-2, dim2=-1).add_((ridge * t)[..., None])
        return out

    factor, info = torch.linalg.cholesky_ex(ridged(gram, trace, 1e-7), upper=True)
    for ridge in (1e-6, 1e-5, 1e-4):
        bad = info != 0
        if not bad.any():
            break
        retry, retry_info = torch.linalg.cholesky_ex(ridged(gram[bad], trace[bad], ridge), upper=True)
        factor[bad], info[bad] = retry, retry_info
    if (info != 0).any():  # after the ridges only a Gram matrix that overflowed float32 is left
        bad = info != 0
        raise NonFiniteValues("Q/K Gram matrix of the low-rank factorisation (float32 overflow)",
                              *first_bad(bad.reshape(*bad.shape[:2], -1).any(dim=-1)))
    return factor


def _top_singular(core: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` left singular vectors (descending) and values of a batch of d x d matrices,
    from the eigendecomposition of core core^T (cheaper than an SVD); zero-padded past d."""
    d = core.shape[-1]
    # float64 on purpose: a float32 eigensolver is ~1.4x faster here but raised KL by 3 % at
    # r = 16 on a rank-8-plus-noise test (squaring the core squares its condition number)
    evals, evecs = torch.linalg.eigh(core @ core.transpose(-1, -2))  # ascending
    r = min(rank, d)
    top = torch.flip(evecs[..., -r:], dims=(-1,))
    sing = torch.flip(evals[..., -r:], dims=(-1,)).clamp_min(0).sqrt()
    if r < rank:
        top = torch.nn.functional.pad(top, (0, rank - r))
        sing = torch.nn.functional.pad(sing, (0, rank - r))
    return top, sing


TopSingular = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def fit_factors(q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float, rank: int,
                top_singular: TopSingular | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 factors A, B [B, L, H, N, rank].

    `top_singular` (core, rank) -> (left vectors, values) solves the d x d core; every store so far
    was written with the default, `_top_singular` (a full float64 eigh), and `benchmarks/fit_subspace.py` holds a
    measured alternative that no store uses (BENCHMARKS.md, "Low-rank fitter").

    Q = U_q R_q with R_q the Cholesky factor of the d x d Gram matrix (a QR without a per-matrix
    LAPACK QR, which costs ~10x more on CPU), likewise centred K; the core scale * R_q R_k^T is
    d x d and its top-r left singular vectors are the top eigenvectors of core core^T. The
    N x d work runs in float32, the d x d work in float64 (it is small, and ill-conditioned
    Gram matrices need the digits). A ridge (1e-7 of the trace, raised where needed) keeps Cholesky
    defined when N < d, when centred K is rank-deficient, or when float32 rounding makes the Gram
    matrix indefinite; it only tilts which rank-r subspace is chosen (at r = d the product is exact
    regardless).
    """
    q = q_BLHNd.float()
    k = k_BLHNd.float()
    k = k - k.mean(dim=-2, keepdim=True)
    gram_q, gram_k = q.transpose(-1, -2) @ q, k.transpose(-1, -2) @ k  # N x d work: every thread
    with one_cpu_thread(q.device):  # thousands of tiny LAPACK calls: one thread (see one_cpu_thread)
        w_a, w_b = _core_weights(gram_q, gram_k, scale, rank, top_singular or _top_singular)
    a, b = q @ w_a, k @ w_b
    require_finite("low-rank factor a", a)
    require_finite("low-rank factor b", b)
    return a, b


def _core_weights(gram_q: torch.Tensor, gram_k: torch.Tensor, scale: float, rank: int,
                  top_singular: TopSingular) -> tuple[torch.Tensor, torch.Tensor]:
    """The d x r maps W_a, W_b with A = Q W_a, B = K_centred W_b (float32), from the Gram matrices."""
    r_q = _cholesky_upper(gram_q)
    r_k = _cholesky_upper(gram_k)
    core = scale * r_q @ r_k.transpose(-1, -2)  # (d, d)
    top, sing = top_singular(core, rank)  # (d, r), (r,)
    alive = sing > 1e-12 * sing[..., :1].clamp_min(1e-300)  # zero directions when N < r
    right = core.transpose(-1, -2) @ top / torch.where(alive, sing, 1.0).unsqueeze(-2)  # (d, r)
    right = right * alive.unsqueeze(-2)
    root = sing.sqrt().unsqueeze(-2)
    # A = U_q top sqrt(S) = Q R_q^{-1} top sqrt(S); B likewise with R_k and the right vectors
    w_a = torch.linalg.solve_triangular(r_q, top * root, upper=True).float()
    w_b = torch.linalg.solve_triangular(r_k, right * root, upper=True).float()
    return w_a, w_b

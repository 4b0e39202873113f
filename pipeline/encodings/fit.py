"""The best rank-r fit of scale * Q (K - mean_tokens K)^T as A B^T, A and B of shape (N, r), by one of
three fitters. Which one wrote a store is in its encoding's JSON (`fitter`, absent meaning `EIGH`, the
first), so a resumed store never mixes them; `lowrank:...:fit=subspace` and `:fit=eigh` write the older
stores' bytes.

Centring K removes a per-row constant from the logits, which softmax ignores, and shrinks the dynamic
range that a quantised row codec must cover. Every fitter starts from the d x d Gram matrices of Q and
centred K (with the final A = Q W_a, B = K W_b the only N x d work) and splits sqrt(S) to both sides so
A and B have similar ranges.

- `CHOLQR` (new stores): block subspace iteration with p = r + 6 columns in Q's coordinates, each
  step's basis made G_q-orthonormal by the Cholesky of a p x p matrix (CholeskyQR), Rayleigh-Ritz on
  p x p. Why: `SUBSPACE` whitens first (a d x d Cholesky and two d x d x d products per matrix, over
  half its time); this one has only d x d x p products and p x p LAPACK calls, for the same KL, and
  runs a chunk's whole fit on one thread while its data is in cache (BENCHMARKS.md, "Low-rank fitter").
- `SUBSPACE` (stores of 2026-12-03): one Cholesky (of Q's side), then block subspace iteration with
  p = r + 6 columns on the whitened d x d matrix, Householder QR between steps, and Rayleigh-Ritz on
  p x p. Why it replaced `EIGH`: that solves all d directions whatever r, and its eigh was 40 % of a
  default precompute unit on CPU.
- `EIGH` (every store before them): Cholesky whitening of both sides and a full float64 eigh of the
  d x d core.
"""
from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from attncache.pipeline._util.runtime import one_cpu_thread
from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.finite import NonFiniteValues, first_bad, not_finite_rows, require_finite

Weights = tuple[torch.Tensor, torch.Tensor]  # W_a, W_b (d, r) float32: A = Q W_a, B = K_centred W_b


class Fitter(Protocol):
    name: str  # the spec's `fit=` and the encoding JSON's "fitter"
    # True: `fit_factors` runs the centring, the Gram matrices, the fit and the final products of each
    # chunk of samples on one CPU thread, which defines this fitter's bits;
    # False: the Gram matrices and products on every thread, the d x d work in chunks, as the first
    # two fitters' stores were made
    whole_chunks: bool

    def weights(self, gram_q: torch.Tensor, gram_k: torch.Tensor, scale: float, rank: int) -> Weights:
        """W_a, W_b from the float32 Gram matrices Q^T Q and K_c^T K_c [..., d, d]."""
        ...


def fit_factors(q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float, rank: int,
                fitter: Fitter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 factors A, B [B, L, H, N, rank] (`fitter` defaults to `CHOLQR`, what new stores use).

    The N x d work (`_factors`) runs in float32, the d x d work in float64 (it is small, and
    ill-conditioned Gram matrices need the digits), in chunks of whole samples on the caller's
    threads, each chunk on one CPU thread (`_in_chunks`). Each matrix's calls are the same sequential
    code at any thread count and in any chunk, so the factors are the same bits at every count.
    - `whole_chunks` fitters (`CHOLQR`): a chunk's whole fit, centring and Gram matrices to the final
      products. Why: on CPU the centred K and the Gram matrices of a whole batch are hundreds of MB
      that each stage reads again from memory, while a chunk's are a few MB, read again while they
      are in cache (the same fit of a ViT-S batch of 12 layers took 214 ms so against 247 ms with the
      batch's Gram matrices first, best of 5: BENCHMARKS.md, "The CholeskyQR fitter").
    - the others: the d x d work alone, as their stores were made. Why chunks at all: that work is
      thousands of tiny LAPACK and BLAS calls, which run on one thread anyway (`one_cpu_thread`), so
      one core sat idle for them; chunks on threads of their own use every core and keep each
      chunk's matrices in cache (the fit of a ViT-S batch took a third of the time, BENCHMARKS.md)."""
    if not (math.isfinite(scale) and scale > 0):  # sqrt(scale * sigma) to both sides needs scale > 0
        raise ValueError(f"the low-rank fit needs the teacher's attention scale to be a positive finite number, "
                         f"got {scale!r}")
    fitter = fitter or CHOLQR

    def fit(gram_q: torch.Tensor, gram_k: torch.Tensor) -> Weights:
        return fitter.weights(gram_q, gram_k, scale, rank)

    if fitter.whole_chunks:
        a, b = _in_chunks(lambda q, k: _factors(fit, q, k), q_BLHNd, k_BLHNd, _FUSED_CHUNK_MATRICES)
    else:
        a, b = _factors(lambda g_q, g_k: _in_chunks(fit, g_q, g_k, _CHUNK_MATRICES), q_BLHNd, k_BLHNd)
    require_finite("low-rank factor a", a)
    require_finite("low-rank factor b", b)
    return a, b


def _factors(weights, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B: K centred, the float32 Gram matrices, `weights(gram_q, gram_k)` -> W_a, W_b, and the
    products, each matrix's on its own."""
    q = q.float()
    k = k.float()
    k = k - k.mean(dim=-2, keepdim=True)
    w_a, w_b = weights(q.transpose(-1, -2) @ q, k.transpose(-1, -2) @ k)
    return q @ w_a, k @ w_b


def _in_chunks(work, x: torch.Tensor, y: torch.Tensor, per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`work(x, y)` -> (u, v) on CPU in chunks of whole samples (about `per_chunk` matrices each, the
    leading axis cut), spread over the caller's torch threads, each chunk on one thread, and the
    chunks' results joined. One chunk, no sample, or a GPU: `work` on the whole, on the caller's
    threads. A refusal inside a chunk names its sample's index in the whole batch; the caller's
    autograd and inference modes hold in every chunk."""
    if x.device.type != "cpu" or x.dim() < 3:
        return work(x, y)
    step = max(1, -(-per_chunk // math.prod(x.shape[1:-2])))  # whole samples per chunk
    starts = range(0, x.shape[0], step)
    if len(starts) <= 1:  # one chunk, or no sample at all
        return work(x, y)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def chunk(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):  # the caller's modes
            try:
                return work(x[start:start + step], y[start:start + step])
            except NonFiniteValues as bad:  # at the batch index of the whole batch, not of the chunk
                raise NonFiniteValues(bad.what, bad.sample + start, bad.layer) from None

    with _chunked_fit:
        threads = torch.get_num_threads()
        with one_cpu_thread(x.device):  # this thread's calls, like the pool's, on one thread
            parts = list(_pool(threads).map(chunk, starts)) if threads > 1 else [chunk(s) for s in starts]
    return torch.cat([u for u, _ in parts]), torch.cat([v for _, v in parts])


# d x d problems per chunk of the other fitters' d x d work: a chunk's float64 work (about 32 KB per matrix, several
# copies) stays in the cache, and a batch gives each CPU thread several chunks
_CHUNK_MATRICES = 256
# matrices per chunk of a `whole_chunks` fit: a chunk's Q and K (100 KB per ViT-S head) and Gram
# matrices stay near the cache, and a batch gives each thread several chunks to even out
_FUSED_CHUNK_MATRICES = 128
_pools: dict[int, ThreadPoolExecutor] = {}
# One chunked fit at a time: each sets the process's torch thread count to 1 and back, and two of
# them interleaved could leave it at 1 (every later forward at half speed)
_chunked_fit = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads that run on one torch thread each (set once, as each thread starts)."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attncache-fit",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _pools[workers]


def _overflowed(bad: torch.Tensor) -> NonFiniteValues:
    """The refusal for Gram matrices that overflowed float32, at the first (sample, layer) of `bad`
    [B, L, ...] (one flag per Gram matrix)."""
    return NonFiniteValues("Q/K Gram matrix of the low-rank factorisation (float32 overflow)",
                           *first_bad(bad.reshape(*bad.shape[:2], -1).any(dim=-1)))


def _has_signal(gram_q: torch.Tensor, gram_k: torch.Tensor) -> torch.Tensor:
    """[...] False where Q or centred K is all zeros (a zeroed head, a single token, constant keys):
    the logits are then one constant per row, which softmax ignores, so every direction is dead. The
    ridged Cholesky of a zero Gram matrix would otherwise scale noise by 1e154 into inf."""
    trace_q = gram_q.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace_k = gram_k.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((trace_q > 0) & (trace_k > 0)).unsqueeze(-1)


def _split_root(sing: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(S) for A's side and 1 / sqrt(S) for B's, (..., 1, r), both zero on dead directions."""
    root = torch.where(alive, sing, 1.0).sqrt()
    return (root * alive).unsqueeze(-2), (alive / root).unsqueeze(-2)


# ---------------------------------------------------------------------------------------------- EIGH


def _cholesky_upper(gram: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of Gram matrices (float64) with a small ridge (`_cholesky`): `EIGH`'s."""
    return _cholesky(gram, upper=True)


def _cholesky(gram: torch.Tensor, upper: bool) -> torch.Tensor:
    """Cholesky factor of Gram matrices in float64 with a ridge of 1e-7 of the trace, raised to 1e-6,
    1e-5, 1e-4 where float32 rounding left a rank-deficient Gram matrix (N < d, centred K) slightly
    indefinite. The ridge is written on the diagonal alone: the same values as adding trace * I (off
    the diagonal x + 0.0 == x) for a fifth of the time. `upper=False` is LAPACK's own triangle (no
    triangle to clear afterwards); `SUBSPACE` takes it, `EIGH` the upper one its stores were made with."""
    gram = gram.double()
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)  # the ridges are fractions of it

    def ridged(g: torch.Tensor, t: torch.Tensor, ridge: float) -> torch.Tensor:
        out = g.clone()
        out.diagonal(dim1=-2, dim2=-1).add_((ridge * t)[..., None])
        return out

    factor, info = torch.linalg.cholesky_ex(ridged(gram, trace, 1e-7), upper=upper)
    for ridge in (1e-6, 1e-5, 1e-4):
        bad = info != 0
        if not bad.any():
            break
        retry, retry_info = torch.linalg.cholesky_ex(ridged(gram[bad], trace[bad], ridge), upper=upper)
        factor[bad], info[bad] = retry, retry_info
    if (info != 0).any():  # after the ridges only a Gram matrix that overflowed float32 is left
        raise _overflowed(info != 0)
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


@dataclass(frozen=True)
class EighFit:
    """Q = U_q R_q with R_q the Cholesky factor of the d x d Gram matrix (a QR without a per-matrix
    LAPACK QR, which costs ~10x more on CPU), likewise centred K; the core scale * R_q R_k^T is
    d x d and its top-r left singular vectors are the top eigenvectors of core core^T. A ridge (1e-7
    of the trace, raised where needed) keeps Cholesky defined when N < d, when centred K is
    rank-deficient, or when float32 rounding makes the Gram matrix indefinite; it only tilts which
    rank-r subspace is chosen (at r = d the product is exact regardless)."""

    name: str = "eigh"
    whole_chunks = False

    def weights(self, gram_q: torch.Tensor, gram_k: torch.Tensor, scale: float, rank: int) -> Weights:
        with one_cpu_thread(gram_q.device):  # as every EIGH store was written
            return self._weights(gram_q, gram_k, scale, rank)

    def _weights(self, gram_q: torch.Tensor, gram_k: torch.Tensor, scale: float, rank: int) -> Weights:
        r_q = _cholesky_upper(gram_q)
        r_k = _cholesky_upper(gram_k)
        core = scale * r_q @ r_k.transpose(-1, -2)  # (d, d)
        top, sing = _top_singular(core, rank)  # (d, r), (r,)
        alive = sing > 1e-12 * sing[..., :1].clamp_min(1e-300)  # zero directions when N < r
        # a zero Q or centred K gave inf factors here, and precompute refused them: zero factors instead
        # (no stored byte changes, as no store could hold those)
        signal = _has_signal(gram_q, gram_k)
        alive = alive & signal
        right = core.transpose(-1, -2) @ top / torch.where(alive, sing, 1.0).unsqueeze(-2)  # (d, r)
        right = right * alive.unsqueeze(-2)
        root = (sing.sqrt() * signal).unsqueeze(-2)  # x 1.0 where there is signal: the same bits
        # A = U_q top sqrt(S) = Q R_q^{-1} top sqrt(S); B likewise with R_k and the right vectors
        w_a = torch.linalg.solve_triangular(r_q, top * root, upper=True).float()
        w_b = torch.linalg.solve_triangular(r_k, right * root, upper=True).float()
        return w_a, w_b


# ---------------------------------------------------------------------------------------------- SUBSPACE


@functools.lru_cache(maxsize=16)
def _start_block(d: int, p: int) -> torch.Tensor:
    """The fixed d x p start of the iteration, float64 on the CPU: a quasi-random (Weyl) sequence
    frac((i + 1) sqrt(prime_j)) - 1/2, the same numbers on every machine and torch version, no RNG.
    The iteration only needs a start not orthogonal to the top subspace, which data never arranges."""
    with torch.inference_mode(False):  # cached: an inference tensor could not meet autograd later
        return _weyl_block(d, p)


def _weyl_block(d: int, p: int) -> torch.Tensor:
    primes = [n for n in range(2, 64 * p) if all(n % m for m in range(2, math.isqrt(n) + 1))][:p]
    i = torch.arange(1, d + 1, dtype=torch.float64)[:, None]
    alpha = torch.tensor(primes, dtype=torch.float64).sqrt()[None, :]
    return torch.frac(i * alpha) - 0.5


@dataclass(frozen=True)
class SubspaceFit:
    """Q = U_q R_q as in `EIGH` (its ridged Cholesky of G_q), so M M^T = U_q (scale^2 S) U_q^T with
    S = R_q G_k R_q^T (d x d, symmetric): the top-r eigenvectors T of S give U = U_q T, A = Q R_q^{-1} T
    sqrt(Sigma) and B = M^T U Sigma^{-1/2} = K_c (scale R_q^T T Sigma^{-1/2}), so K needs no Cholesky.
    T comes from `steps` products X <- S Q(X) (Q(X): Householder QR, stable however far the columns'
    scales drift apart) from `_start_block`, then the p x p Rayleigh-Ritz problem Q(X)^T S Q(X). A fixed
    start and step count make the factors a pure function of the Gram matrices. Where p > 0.4 d (at
    d = 64: r > 19; at d = 16: every r) the full eigh is faster, and exact: `EIGH`'s weights are used."""

    name: str = "subspace"
    whole_chunks = False
    steps: int = 6
    extra: int = 6  # columns beyond r: the r-th pair converges as (lambda_{r+extra+1} / lambda_r)^steps

    def __post_init__(self):
        # the name is what a store records: other steps or columns make other bits, so another name
        if self.name == "subspace" and (self.steps, self.extra) != (6, 6):
            raise ValueError("a SubspaceFit with other steps or columns than the stores' needs its own name")

    def weights(self, gram_q: torch.Tensor, gram_k: torch.Tensor, scale: float, rank: int) -> Weights:
        d = gram_q.shape[-1]
        p = rank + self.extra
        if 5 * p > 2 * d:  # measured crossover (BENCHMARKS.md): past p = 0.4 d the QRs cost more than the eigh
            return EIGH.weights(gram_q, gram_k, scale, rank)
        finite_k = torch.isfinite(gram_k).all(dim=-1).all(dim=-1)
        if not finite_k.all():
            raise _overflowed(~finite_k)
        one_thread = functools.partial(one_cpu_thread, gram_q.device)  # LAPACK only; matmuls on every thread
        with one_thread():
            r_q = _cholesky(gram_q, upper=False).transpose(-1, -2)  # refuses a G_q that overflowed float32
        s_dd = r_q @ gram_k.double() @ r_q.transpose(-1, -2)
        x = s_dd @ _start_block(d, p).to(s_dd.device)
        for _ in range(self.steps):
            with one_thread():
                basis = torch.linalg.qr(x).Q
            x = s_dd @ basis
        with one_thread():
            basis = torch.linalg.qr(x).Q  # (d, p), orthonormal
            evals, evecs = torch.linalg.eigh(basis.transpose(-1, -2) @ s_dd @ basis)  # ascending
        top = basis @ torch.flip(evecs[..., -rank:], dims=(-1,))  # (d, r)
        lam = torch.flip(evals[..., -rank:], dims=(-1,)).clamp_min(0)
        alive = (lam > 1e-24 * lam[..., :1].clamp_min(1e-300)) & _has_signal(gram_q, gram_k)  # as EIGH's
        up, down = _split_root(scale * lam.sqrt(), alive)
        with one_thread():
            w_a = torch.linalg.solve_triangular(r_q, top * up, upper=True)
        return w_a.float(), (r_q.transpose(-1, -2) @ (top * (scale * down))).float()


# ---------------------------------------------------------------------------------------------- CHOLQR


@dataclass(frozen=True)
class CholQRFit:
    """`SUBSPACE`'s iteration without its d x d work: the same operator from the same start, six
    products of it (`SUBSPACE` makes seven), iterated in Q's coordinates.
    With U = Q X and X^T G_q X = I (U orthonormal), M M^T U = scale^2 Q (G_k G_q X), so the subspace
    iteration is X <- G_k G_q X, orthonormalised in the G_q inner product by CholeskyQR (the Cholesky
    of the p x p X^T G_q X); Rayleigh-Ritz on Y^T G_k Y (Y = G_q X, p x p) gives T, Lambda, and
    A = Q (X T sqrt(Sigma)), B = K_c (scale Y T Sigma^{-1/2}). Why: `SUBSPACE` whitens first, a d x d
    Cholesky and two d x d x d products per matrix, over half its time; here every product is d x d x p
    and the LAPACK calls are p x p. The last basis is orthonormalised twice (CholeskyQR2) and checked:
    a matrix whose basis is not G_q-orthonormal to 1e-6 (fewer tokens than columns, Q or K of rank
    under p, a zero head) is fitted by `SUBSPACE` instead, which has the ridges for those; that is a
    property of the matrix alone, so the bits stay a pure function of its Gram matrices. Where
    p > 0.4 d `EIGH`'s weights are used, as by `SUBSPACE`."""

    name: str = "cholqr"
    whole_chunks = True
    steps: int = 6
    extra: int = 6

    def __post_init__(self):
        if self.name == "cholqr" and (self.steps, self.extra) != (6, 6):
            raise ValueError("a CholQRFit with other steps or columns than the stores' needs its own name")

    def weights(self, gram_q: torch.Tensor, gram_k: torch.Tensor, scale: float, rank: int) -> Weights:
        d = gram_q.shape[-1]
        p = rank + self.extra
        if 5 * p > 2 * d:
            return EIGH.weights(gram_q, gram_k, scale, rank)
        for gram in (gram_q, gram_k):  # before any fallback, whose refusal would index a subset
            bad = _not_finite(gram)
            if bad.any():
                raise _overflowed(bad)
        g_q, g_k = gram_q.double(), gram_k.double()
        with one_cpu_thread(gram_q.device):
            held = None
            if torch.is_grad_enabled() and (g_q.requires_grad or g_k.requires_grad):
                # a head that falls back made inf/NaN on the way, which a backward pass would carry into
                # the gradient of the whole input (0 * NaN): find those heads first, and iterate on
                # identities in their place (their weights are replaced anyway)
                with torch.no_grad():
                    held = self._iterate(g_q, g_k, scale, rank, p)[2]
                keep, eye = held[..., None, None], torch.eye(d, dtype=g_q.dtype, device=g_q.device)
                g_q, g_k = torch.where(keep, g_q, eye), torch.where(keep, g_k, eye)
            w_a, w_b, ok = self._iterate(g_q, g_k, scale, rank, p)
            ok = ok if held is None else held
            if not ok.all():
                bad = ~ok
                w_a[bad], w_b[bad] = SUBSPACE.weights(gram_q[bad], gram_k[bad], scale, rank)
        return w_a, w_b

    def _iterate(self, g_q: torch.Tensor, g_k: torch.Tensor, scale: float, rank: int,
                 p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 W_a, W_b and a [...] flag of the matrices whose basis held (the others' weights are
        left as whatever came out, zeros where that was not finite)."""
        d = g_q.shape[-1]
        ok = torch.ones(g_q.shape[:-2], dtype=torch.bool, device=g_q.device)
        # expanded, not broadcast: a [d, p] right operand makes one gemm of the whole chunk, whose
        # kernel may depend on the chunk's size; a batch of products is each matrix's own call
        x = _start_block(d, p).to(g_q.device).expand(*g_q.shape[:-2], d, p)
        for _ in range(self.steps):
            gx = g_q @ x
            (y,), info = _orthonormalised(x, gx, gx)
            ok &= info == 0
            x = g_k @ y
        (x,), info = _orthonormalised(x, g_q @ x, x)
        ok &= info == 0
        gx = g_q @ x
        (x, y), info = _orthonormalised(x, gx, x, gx)  # CholeskyQR2: the second pass removes the first's rounding
        ok &= info == 0
        eye = torch.eye(p, dtype=x.dtype, device=x.device)
        ok &= ((x.transpose(-1, -2) @ y - eye).abs().amax(dim=(-1, -2)) < 1e-6) & ~_not_finite(y)
        held = ok[..., None, None]
        core = torch.where(held, y.transpose(-1, -2) @ (g_k @ y), eye)  # no NaN reaches eigh's batch
        evals, evecs = torch.linalg.eigh(core)  # ascending
        top = torch.flip(evecs[..., -rank:], dims=(-1,))
        lam = torch.flip(evals[..., -rank:], dims=(-1,)).clamp_min(0)
        alive = (lam > 1e-24 * lam[..., :1].clamp_min(1e-300)) & _has_signal(g_q, g_k)  # as SUBSPACE's
        up, down = _split_root(scale * lam.sqrt(), alive)
        w_a = torch.where(held, x, 0.0) @ (top * up)
        w_b = torch.where(held, y, 0.0) @ (top * (scale * down))
        return w_a.float(), w_b.float(), ok


def _orthonormalised(x: torch.Tensor, gx: torch.Tensor, *others: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each of `others` times L^{-T}, with L L^T = X^T G X the Cholesky factor (gx = G X): what making
    X G-orthonormal (one CholeskyQR pass) does to X and to G X. And LAPACK's info: non-zero where
    X^T G X was not positive definite."""
    low, info = torch.linalg.cholesky_ex(x.transpose(-1, -2) @ gx)
    upper = low.transpose(-1, -2)
    return [torch.linalg.solve_triangular(upper, t, upper=True, left=False) for t in others], info


def _not_finite(x: torch.Tensor) -> torch.Tensor:
    """[...] True where a matrix [..., m, n] holds inf or NaN (`not_finite_rows`' summed screen)."""
    return not_finite_rows(x.flatten(-2))


@dataclass(frozen=True)
class UnknownFit:
    """A fitter named by a store that this version does not know: the store reads (decoding needs no
    fitter), but nothing is fitted with it, so a resume cannot mix fitters."""

    name: str
    whole_chunks = False

    def weights(self, gram_q, gram_k, scale, rank) -> Weights:
        raise SpecError(f"this store's factors were made by the low-rank fitter {self.name!r}, which this "
                        f"attncache does not know (known: {', '.join(FITTERS)}): it can read the store, "
                        "not add to it")


EIGH = EighFit()
SUBSPACE = SubspaceFit()
CHOLQR = CholQRFit()
FITTERS: dict[str, Fitter] = {f.name: f for f in (CHOLQR, SUBSPACE, EIGH)}

"""Attention factor encodings: what is stored per (sample, layer, head) and how logits come back.

The teacher's attention in layer l, head h is softmax(logits) with logits = scale * Q K^T, Q and K of
shape (N, d). Storing the N x N maps costs N^2 per head; storing factors costs N * (2 x width).
Every encoding turns captured Q/K of shape [B, L, H, N, d] into named numpy arrays whose leading
axis is the sample, and turns those arrays back into logits [B, L, H, N, N] on the training device.
Logits are only defined up to a per-row constant (softmax ignores it), which `lowrank` exploits.

Spec strings: `exact:fp16`, `exact:fp32`, `exact:bf16`, `lowrank:r=16`, `lowrank:r=16:int8`,
`lowrank:r=8:fp32`; `pipeline/encodings/extra.py` adds int4 / fp8 rows, quantised exact Q/K and
per-layer rank schedules (`exact:int8`, `lowrank:r=16:int4`, `lowrank:r=4,4,8,8:int8`).
`storage_schema/README.md` gives the arithmetic for readers in other languages.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.finite import NonFiniteValues, first_bad, require_finite

INT8_MAX = 127.0

# What a consumer can ask an encoding to decode (`Encoding.decode(arrays, what, scale, device)`):
# "logits" [B, L, H, N, N] = scale * Q K^T up to a per-row constant, "q" / "k" [B, L, H, N, d].
SIGNALS = ("logits", "q", "k")
QK_ENCODINGS = "exact:fp32, exact:fp16, exact:bf16, exact:int8, exact:fp8, exact:int4"
LOGIT_FACTORS_ONLY = "stores only logit factors (A B^T ~= scale Q K^T), not Q and K"


class CannotDecode(ValueError):
    """An encoding was asked for a tensor its stored arrays do not hold (Q or K from logit factors)."""


def check_signal(encoding, what: str) -> None:
    """Raise `CannotDecode`, naming the encoding, unless it can decode `what`: the one refusal that
    the fit check, `plan` and every decoder share."""
    if what not in SIGNALS:
        raise ValueError(f"unknown signal {what!r}; known: {', '.join(SIGNALS)}")
    if what not in encoding.decodes:
        raise CannotDecode(f"encoding {encoding.spec} {encoding.refusal}, so it cannot decode {what}")


@dataclass(frozen=True)
class ArraySpec:
    """One stored array per sample: trailing shape after the slot axis, and its numpy dtype."""

    name: str
    trailing_shape: tuple[int, ...]
    dtype: str
    meaning: str


# ---------------------------------------------------------------------------------------------
# dtype helpers: bfloat16 has no numpy dtype, so it is stored as its raw uint16 bit pattern.

_FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


def _to_storage(x: torch.Tensor, dtype_name: str) -> np.ndarray:
    if dtype_name == "bf16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, _FLOAT_DTYPES[dtype_name])).contiguous().cpu().numpy()


def _from_storage(x: torch.Tensor, dtype_name: str) -> torch.Tensor:
    if dtype_name == "bf16":
        return x.view(torch.bfloat16).float()  # x holds the raw bits as int16 (see _as_tensor)
    return x.float()


def _as_tensor(a, device) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        if a.dtype == np.uint16:
            a = a.view(np.int16)
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.to(device)


# ---------------------------------------------------------------------------------------------
# int8 with one scale per (token, head) row: the row's max magnitude maps to 127.


def quantize_rows_int8(x_BLHNr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    amax = x_BLHNr.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(torch.float16).float()
    q = torch.clamp(torch.round(x_BLHNr / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q.cpu().numpy(), scale.squeeze(-1).to(torch.float16).cpu().numpy()


def dequantize_rows_int8(q_BLHNr: torch.Tensor, scale_BLHN: torch.Tensor) -> torch.Tensor:
    return q_BLHNr.float() * scale_BLHN.float().unsqueeze(-1)


def _cholesky_upper(gram: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of Gram matrices with a small ridge, raised where float32 rounding
    left a rank-deficient Gram matrix (N < d, centred K) slightly indefinite."""
    d = gram.shape[-1]
    gram = gram.double()
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    level = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[..., None, None] * eye  # trace * I
    factor, info = torch.linalg.cholesky_ex(gram + 1e-7 * level, upper=True)
    for ridge in (1e-6, 1e-5, 1e-4):
        bad = info != 0
        if not bad.any():
            break
        retry, retry_info = torch.linalg.cholesky_ex(gram[bad] + ridge * level[bad], upper=True)
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


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactEncoding:
    """Q and K as the teacher's attention used them. Serves every transfer mode, copy_q/copy_k too."""

    dtype: str = "fp16"

    @property
    def spec(self) -> str:
        return f"exact:{self.dtype}"

    decodes = frozenset(SIGNALS)
    refusal = ""

    @property
    def serves_qk(self) -> bool:
        return {"q", "k"} <= self.decodes

    def array_specs(self, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> list[ArraySpec]:
        shape = (num_layers, num_heads, num_tokens, head_dim)
        storage = _FLOAT_DTYPES[self.dtype]
        return [ArraySpec("q", shape, storage, f"queries after q_norm, before scale ({self.dtype})"),
                ArraySpec("k", shape, storage, f"keys after k_norm ({self.dtype})")]

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        return {"q": _to_storage(q_BLHNd, self.dtype), "k": _to_storage(k_BLHNd, self.dtype)}

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 "q" / "k" [B, L, H, N, d] or "logits" [B, L, H, N, N] on `device`: the one decode
        of this encoding that the trainer, verify, fidelity and show all call."""
        check_signal(self, what)
        if what == "logits":
            q, k = self.decode(arrays, "q", scale, device), self.decode(arrays, "k", scale, device)
            return (q * scale) @ k.transpose(-1, -2)
        return _from_storage(_as_tensor(arrays[what], device), self.dtype)

    def decode_qk(self, arrays: dict, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 Q and K [B, L, H, N, d]: what copy_q / copy_k modes need."""
        return self.decode(arrays, "q", 1.0, device), self.decode(arrays, "k", 1.0, device)

    def decode_logits(self, arrays: dict, scale: float, device="cpu") -> torch.Tensor:
        return self.decode(arrays, "logits", scale, device)

    def to_json(self) -> dict:
        return {"kind": "exact", "dtype": self.dtype, "spec": self.spec}


@dataclass(frozen=True)
class LowRankEncoding:
    """A, B of shape (N, r) with A B^T ~= scale * Q (K - mean_tokens K)^T, the best rank-r fit.

    Centring K removes a per-row constant from the logits, which softmax ignores, and shrinks the
    dynamic range that int8 must cover. The factorisation whitens Q and centred K (Cholesky of
    their Gram matrices, standing in for QR), takes the top-r singular pairs of the small d x d core
    (see `factorize`), and splits sqrt(S) to both sides so A and B have similar ranges.
    """

    rank: int = 16
    quant: str = "fp16"  # fp16 | fp32 | int8

    @property
    def spec(self) -> str:
        return f"lowrank:r={self.rank}:{self.quant}"

    decodes = frozenset({"logits"})
    refusal = LOGIT_FACTORS_ONLY

    @property
    def serves_qk(self) -> bool:
        return {"q", "k"} <= self.decodes

    def array_specs(self, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> list[ArraySpec]:
        if self.rank > head_dim:
            raise SpecError(f"lowrank rank r={self.rank} exceeds the teacher's head dim d={head_dim}")
        shape = (num_layers, num_heads, num_tokens, self.rank)
        if self.quant == "int8":
            row = shape[:-1]
            return [ArraySpec("a", shape, "int8", "left factor, int8, times a_scale per row"),
                    ArraySpec("a_scale", row, "float16", "per-(token, head) scale of a"),
                    ArraySpec("b", shape, "int8", "right factor, int8, times b_scale per row"),
                    ArraySpec("b_scale", row, "float16", "per-(token, head) scale of b")]
        storage = _FLOAT_DTYPES[self.quant]
        return [ArraySpec("a", shape, storage, f"left factor ({self.quant})"),
                ArraySpec("b", shape, storage, f"right factor ({self.quant})")]

    def factorize(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Float factors [B, L, H, N, r].

        Q = U_q R_q with R_q the Cholesky factor of the d x d Gram matrix (a QR without a per-matrix
        LAPACK QR, which costs ~10x more on CPU), likewise centred K; the core scale * R_q R_k^T is
        d x d and its top-r left singular vectors are the top eigenvectors of core core^T. The
        N x d work runs in float32, the d x d work in float64 (it is small, and ill-conditioned
        Gram matrices need the digits). A ridge (1e-7 of the trace, raised where needed) keeps Cholesky defined when
        N < d, when centred K is rank-deficient, or when float32 rounding makes the Gram matrix
        indefinite; it only tilts which rank-r subspace is chosen (at r = d the product is exact
        regardless).
        """
        q = q_BLHNd.float()
        k = k_BLHNd.float()
        k = k - k.mean(dim=-2, keepdim=True)
        r_q = _cholesky_upper(q.transpose(-1, -2) @ q)
        r_k = _cholesky_upper(k.transpose(-1, -2) @ k)
        core = scale * r_q @ r_k.transpose(-1, -2)  # (d, d)
        top, sing = _top_singular(core, self.rank)  # (d, r), (r,)
        alive = sing > 1e-12 * sing[..., :1].clamp_min(1e-300)  # zero directions when N < r
        right = core.transpose(-1, -2) @ top / torch.where(alive, sing, 1.0).unsqueeze(-2)  # (d, r)
        right = right * alive.unsqueeze(-2)
        root = sing.sqrt().unsqueeze(-2)
        # A = U_q top sqrt(S) = Q R_q^{-1} top sqrt(S); B likewise with R_k and the right vectors
        w_a = torch.linalg.solve_triangular(r_q, top * root, upper=True).float()
        w_b = torch.linalg.solve_triangular(r_k, right * root, upper=True).float()
        a, b = q @ w_a, k @ w_b
        require_finite("low-rank factor a", a)
        require_finite("low-rank factor b", b)
        return a, b

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        a, b = self.factorize(q_BLHNd, k_BLHNd, scale)
        if self.quant == "int8":
            a_q, a_s = quantize_rows_int8(a)
            b_q, b_s = quantize_rows_int8(b)
            return {"a": a_q, "a_scale": a_s, "b": b_q, "b_scale": b_s}
        return {"a": _to_storage(a, self.quant), "b": _to_storage(b, self.quant)}

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 "logits" [B, L, H, N, N]; "q" / "k" raise `CannotDecode` (only A, B are stored)."""
        check_signal(self, what)
        return self.decode_logits(arrays, scale, device)

    def decode_logits(self, arrays: dict, scale: float, device="cpu") -> torch.Tensor:
        if self.quant == "int8":
            a = dequantize_rows_int8(_as_tensor(arrays["a"], device), _as_tensor(arrays["a_scale"], device))
            b = dequantize_rows_int8(_as_tensor(arrays["b"], device), _as_tensor(arrays["b_scale"], device))
        else:
            a = _from_storage(_as_tensor(arrays["a"], device), self.quant)
            b = _from_storage(_as_tensor(arrays["b"], device), self.quant)
        return a @ b.transpose(-1, -2)

    def to_json(self) -> dict:
        return {"kind": "lowrank", "rank": self.rank, "quant": self.quant, "spec": self.spec}


# ---------------------------------------------------------------------------------------------
# fidelity


def exact_logits(q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> torch.Tensor:
    return (q_BLHNd.float() * scale) @ k_BLHNd.float().transpose(-1, -2)


def attention_kl(ref_logits: torch.Tensor, est_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(est)) per layer, averaged over samples, heads and queries: [L].

    Inputs are [B, L, H, N, N]; the result's axis is the layer axis.
    """
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(est_logits.double(), dim=-1)
    kl_BLHN = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl_BLHN.mean(dim=(0, 2, 3)).float()

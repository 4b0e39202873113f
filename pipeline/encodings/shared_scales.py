"""Cheaper scales for quantised rows: one scale per token shared by every head, and/or a power-of-two
scale stored as one int8 exponent instead of a float16.

Why: with `lowrank:r=8:int8` a (token, head) row of a factor is 8 value bytes and 2 scale bytes, so a
fifth of the store is scales (on ViT-L a quarter of the int4 rows' bytes). Sharing a token's scale
across its H heads cuts the scale bytes H-fold; an int8 exponent halves them again. The cost is
precision: a shared scale is set by the token's largest head, and a power-of-two scale by the next
power of two above max|x| / qmax (up to one bit of the values' range).

Spec: `lowrank:r=R:int8|int4|fp8:scale=token|row-pow2|token-pow2` (`scale=row`, float16 per row, is
the form without the part and keeps its bytes). Arrays, for a factor `a` of rows [L, H, N] and width r:
- `scale=token`: `a` as the row codec stores it, `a_token_scale` float16 [L, N]; value `v * s[l, n]`.
- `scale=row-pow2`: `a`, `a_exp` int8 [L, H, N]; value `v * 2 ** e`.
- `scale=token-pow2`: `a`, `a_token_exp` int8 [L, N]; value `v * 2 ** e[l, n]`.
The scale arrays carry new names, so a reader that knows only `a_scale` refuses such a store.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attncache.pipeline.encodings.finite import NonFiniteValues, first_bad, require_row_scale_fits
from attncache.pipeline.encodings.protocol import ArraySpec
from attncache.pipeline.encodings.rows import as_tensor
from attncache.pipeline.encodings.scaled import ScaledRows, unpack_int4

_FP16_MIN_NORMAL, _FP16_MAX = 2.0 ** -14, 65504.0
EXP_MIN, EXP_MAX = -127, 127  # int8 exponents; -128 is left unused


def values_for(rows: ScaledRows, y: torch.Tensor) -> np.ndarray:
    """Stored values of `y = x / s` (|y| <= qmax) in the row codec's format: the same arithmetic as
    `scaled.py` once the scale is known."""
    if rows.name == "int8":
        return torch.clamp(torch.round(y), -127, 127).to(torch.int8).cpu().numpy()
    if rows.name == "int4":
        v = torch.clamp(torch.round(y), -7, 7).to(torch.int16) + 8
        if v.shape[-1] % 2:
            v = torch.nn.functional.pad(v, (0, 1), value=8)
        return (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8).cpu().numpy()
    if rows.name == "fp8":
        return torch.clamp(y, -448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).cpu().numpy()
    raise ValueError(f"no shared scales for {rows.name} rows")


def values_of(rows: ScaledRows, stored: torch.Tensor, width: int) -> torch.Tensor:
    if rows.name == "int4":
        return unpack_int4(stored, width).float()
    if rows.name == "fp8":
        return stored.view(torch.float8_e4m3fn).float()
    return stored.float()


@dataclass(frozen=True)
class Fp16Scale:
    """s = max|x| / qmax rounded to float16 (1 if the group is all zero, at least the smallest normal)."""

    suffix = "scale"
    dtype = "float16"
    pow2 = False

    def fit(self, amax: torch.Tensor, qmax: float) -> tuple[torch.Tensor, np.ndarray]:
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).clamp(_FP16_MIN_NORMAL, _FP16_MAX)
        s16 = s.to(torch.float16)
        return s16.float(), s16.cpu().numpy()

    def scale(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


@dataclass(frozen=True)
class Pow2Scale:
    """s = 2 ** e, e the smallest integer with max|x| / qmax <= 2 ** e, stored as int8 (0 for an
    all-zero group, clamped to [-127, 127]: smaller groups round towards zero)."""

    suffix = "exp"
    dtype = "int8"
    pow2 = True

    def fit(self, amax: torch.Tensor, qmax: float) -> tuple[torch.Tensor, np.ndarray]:
        mantissa, exponent = torch.frexp((amax / qmax).double())  # amax / qmax = m * 2^k, m in [0.5, 1)
        e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two needs no step up
        e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(EXP_MIN, EXP_MAX).to(torch.int8)
        return self.scale(e), e.cpu().numpy()

    def scale(self, stored: torch.Tensor) -> torch.Tensor:
        return torch.exp2(stored.float())


@dataclass(frozen=True)
class SharedScaleRows:
    """A `ScaledRows` format whose scales are grouped per token across heads and/or power-of-two.

    Rows are [..., L, H, N, w] (the head axis third from the end, as every family stores them)."""

    rows: ScaledRows
    per_token: bool
    fmt: Fp16Scale | Pow2Scale

    @property
    def scheme(self) -> str:
        return ("token" if self.per_token else "row") + ("-pow2" if self.fmt.pow2 else "")

    @property
    def name(self) -> str:
        return f"{self.rows.name}:scale={self.scheme}"

    @property
    def quant(self) -> str:
        return self.rows.name

    @property
    def values_per_byte(self) -> int:
        return self.rows.values_per_byte

    def _scale_name(self, array: str) -> str:
        return f"{array}_{'token_' if self.per_token else ''}{self.fmt.suffix}"

    def specs(self, array: str, rows: tuple[int, ...], width: int, meaning: str) -> list[ArraySpec]:
        stored = (*rows, -(-width // self.values_per_byte))
        scale_name = self._scale_name(array)
        scale_rows = (*rows[:-2], rows[-1]) if self.per_token else rows
        how = "2 ** (int8 exponent)" if self.fmt.pow2 else "float16"
        group = "per token, shared by every head" if self.per_token else "per row"
        return [ArraySpec(array, stored, self.rows.stored_dtype,
                          f"{meaning}: {self.rows.name} values, times {scale_name} {group}"),
                ArraySpec(scale_name, scale_rows, self.fmt.dtype, f"{how} scale of {array} {group}")]

    def encode(self, array: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        x = x.float()
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise NonFiniteValues(f"{array} before {self.name} rows",
                                  *first_bad(~torch.isfinite(x).reshape(*x.shape[:2], -1).all(-1)))
        if not self.fmt.pow2:
            require_row_scale_fits(f"{array} in {self.name} rows", x, self.rows.qmax)
        amax = x.abs().amax(dim=-1, keepdim=True)
        if self.per_token:
            amax = amax.amax(dim=-3, keepdim=True)  # [..., L, 1, N, 1]
        scale, stored = self.fmt.fit(amax, self.rows.qmax)
        stored = stored.squeeze(-1).squeeze(-2) if self.per_token else stored.squeeze(-1)
        return {array: values_for(self.rows, x / scale), self._scale_name(array): stored}

    def decode(self, array: str, arrays: dict, device, width: int) -> torch.Tensor:
        values = values_of(self.rows, as_tensor(arrays[array], device), width)
        scale = self.fmt.scale(as_tensor(arrays[self._scale_name(array)], device)).unsqueeze(-1)
        return values * (scale.unsqueeze(-3) if self.per_token else scale)

    def width(self, stored: int) -> int:
        return stored * self.values_per_byte


SCHEMES = ("token", "row-pow2", "token-pow2")


def shared_scale_rows(rows: ScaledRows, scheme: str) -> SharedScaleRows:
    """`scheme` one of SCHEMES (callers refuse other text with the grammar)."""
    return SharedScaleRows(rows, scheme.startswith("token"), Pow2Scale() if scheme.endswith("pow2") else Fp16Scale())

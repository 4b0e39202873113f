"""Encodings beyond the core two: int4 / fp8 rows, quantised exact Q/K, per-layer rank schedules.

Every class here has the interface of `factors.ExactEncoding` / `factors.LowRankEncoding` (spec,
serves_qk, array_specs, encode, decode_logits, to_json), so the store, precompute and a trainer's
batched decode (`decode_logits(arrays, scale, device)` on stacked [B, L, H, N, *] arrays) use them
unchanged. `factors.parse_encoding` hands every spec to `parse_exact` / `parse_lowrank` here, which
return the core classes for the core specs, so their specs and bytes are untouched.

A row codec stores a float tensor [..., w] (one row per (layer, head, token)) as named arrays:
- fp32, fp16: the values; bf16: its raw bits as uint16 (as in `factors`).
- int8: v = round(x / s) in [-127, 127] as int8, s = max|x| / 127 per row as float16 (`<name>_scale`).
- int4: v = round(x / s) in [-7, 7], s = max|x| / 7 per row (float16); two values per uint8 byte,
  offset by 8: byte i = (v[2i] + 8) | (v[2i+1] + 8) << 4, an odd width padded with one v = 0.
- fp8: x / s as float8 e4m3fn bits in uint8 (numpy has no fp8), s = max|x| / 448 per row (float16).
Decoding is x ~= v * s in every scaled case; `storage_schema/README.md` has the same arithmetic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.core import (_FLOAT_DTYPES, LOGIT_FACTORS_ONLY, SIGNALS, ArraySpec, ExactEncoding,
    LowRankEncoding, _as_tensor, _from_storage, _to_storage, check_signal, dequantize_rows_int8, quantize_rows_int8)
from attncache.pipeline.encodings.finite import require_row_scale_fits

SCALED_QUANTS = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}  # largest stored magnitude of each
QUANTS = (*_FLOAT_DTYPES, *SCALED_QUANTS)  # fp32 fp16 bf16 int8 int4 fp8
_CORE_LOWRANK_QUANTS = ("fp16", "fp32", "int8", "bf16")  # LowRankEncoding handles these itself
_FP16_MIN_NORMAL, _FP16_MAX = 2.0 ** -14, 65504.0


# ---------------------------------------------------------------------------------------------- row codecs


def _row_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row scale [..., 1], rounded to float16 before use so that decoding with the stored scale
    is exactly what encoding assumed; all-zero rows get 1, tiny rows the smallest normal float16."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale.clamp(_FP16_MIN_NORMAL, _FP16_MAX).to(torch.float16).float()


def quantize_rows_int4(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[..., w] float -> packed uint8 [..., ceil(w / 2)] and float16 scales [...]."""
    scale = _row_scale(x, SCALED_QUANTS["int4"])
    v = torch.clamp(torch.round(x / scale), -7, 7).to(torch.int16) + 8  # 1..15; 8 is zero
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1), value=8)
    packed = (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8)
    return packed.cpu().numpy(), scale.squeeze(-1).to(torch.float16).cpu().numpy()


def unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., ceil(w / 2)] -> int16 values [..., w] (in [-7, 7] for bytes written by the encoder)."""
    p = packed.to(torch.int16)
    both = torch.stack(((p & 0xF) - 8, (p >> 4) - 8), dim=-1)
    return both.flatten(-2)[..., :width]


def quantize_rows_fp8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[..., w] float -> float8 e4m3fn bits as uint8 [..., w] and float16 scales [...]."""
    scale = _row_scale(x, SCALED_QUANTS["fp8"])
    v = torch.clamp(x.float() / scale, -448.0, 448.0).to(torch.float8_e4m3fn)
    return v.view(torch.uint8).cpu().numpy(), scale.squeeze(-1).to(torch.float16).cpu().numpy()


@dataclass(frozen=True)
class RowCodec:
    """How one float tensor [..., w] is stored: arrays `<name>` (and `<name>_scale` when scaled)."""

    quant: str

    def specs(self, name: str, rows: tuple[int, ...], width: int, meaning: str) -> list[ArraySpec]:
        if self.quant in _FLOAT_DTYPES:
            return [ArraySpec(name, (*rows, width), _FLOAT_DTYPES[self.quant], f"{meaning} ({self.quant})")]
        stored = {"int8": ((*rows, width), "int8", "int8, times <name>_scale per row"),
                  "int4": ((*rows, (width + 1) // 2), "uint8", "int4 pairs packed low nibble first, offset 8, "
                                                                  "times <name>_scale per row"),
                  "fp8": ((*rows, width), "uint8", "float8 e4m3fn bits, times <name>_scale per row")}[self.quant]
        shape, dtype, how = stored
        return [ArraySpec(name, shape, dtype, f"{meaning}: {how.replace('<name>', name)}"),
                ArraySpec(f"{name}_scale", rows, "float16", f"per-row scale of {name}")]

    def encode(self, name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        if self.quant in _FLOAT_DTYPES:
            return {name: _to_storage(x, self.quant)}
        quantize = {"int8": quantize_rows_int8, "int4": quantize_rows_int4, "fp8": quantize_rows_fp8}[self.quant]
        require_row_scale_fits(f"{name} in {self.quant} rows", x.float(), SCALED_QUANTS[self.quant])
        values, scales = quantize(x.float())
        return {name: values, f"{name}_scale": scales}

    def decode(self, name: str, arrays: dict, device, width: int) -> torch.Tensor:
        """Float32 [..., width] on `device`."""
        stored = _as_tensor(arrays[name], device)
        if self.quant in _FLOAT_DTYPES:
            return _from_storage(stored, self.quant)
        scale = _as_tensor(arrays[f"{name}_scale"], device)
        if self.quant == "int8":
            return dequantize_rows_int8(stored, scale)
        if self.quant == "int4":
            values = unpack_int4(stored, width).float()
        else:
            values = stored.view(torch.float8_e4m3fn).float()
        return values * scale.float().unsqueeze(-1)


# ---------------------------------------------------------------------------------------------- encodings


@dataclass(frozen=True)
class QuantExactEncoding:
    """Q and K themselves, quantised per (layer, head, token) row: int8, int4 or fp8 with a float16
    scale per row. Serves every transfer mode like `exact` (Q and K come back, approximately)."""

    dtype: str = "int8"  # int8 | int4 | fp8
    decodes = frozenset(SIGNALS)
    refusal = ""

    @property
    def spec(self) -> str:
        return f"exact:{self.dtype}"

    @property
    def serves_qk(self) -> bool:
        return {"q", "k"} <= self.decodes

    def array_specs(self, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> list[ArraySpec]:
        if self.dtype == "int4" and head_dim % 2:
            raise SpecError(f"{self.spec} packs two values per byte: the head dim d={head_dim} must be even")
        rows, codec = (num_layers, num_heads, num_tokens), RowCodec(self.dtype)
        return (codec.specs("q", rows, head_dim, "queries after q_norm, before scale")
                + codec.specs("k", rows, head_dim, "keys after k_norm"))

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        codec = RowCodec(self.dtype)
        return {**codec.encode("q", q_BLHNd), **codec.encode("k", k_BLHNd)}

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 "q" / "k" [B, L, H, N, d] (v * per-row scale; int4 unpacked to d = 2 x stored
        bytes, which `array_specs` guarantees by refusing an odd d) or "logits" [B, L, H, N, N]."""
        check_signal(self, what)
        if what == "logits":
            q, k = self.decode(arrays, "q", scale, device), self.decode(arrays, "k", scale, device)
            return (q * scale) @ k.transpose(-1, -2)
        width = int(arrays[what].shape[-1]) * (2 if self.dtype == "int4" else 1)
        return RowCodec(self.dtype).decode(what, arrays, device, width)

    def decode_qk(self, arrays: dict, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 Q and K [B, L, H, N, d]."""
        return self.decode(arrays, "q", 1.0, device), self.decode(arrays, "k", 1.0, device)

    def decode_logits(self, arrays: dict, scale: float, device="cpu") -> torch.Tensor:
        return self.decode(arrays, "logits", scale, device)

    def to_json(self) -> dict:
        return {"kind": "exact", "dtype": self.dtype, "spec": self.spec}


@dataclass(frozen=True)
class RankedLowRankEncoding:
    """Low-rank factors as `LowRankEncoding` (A B^T ~= scale Q (K - mean K)^T), with int4 / fp8 rows
    and/or a rank per cached layer.

    `ranks` holds one rank for every layer, or one per cached layer in layer-axis order. Arrays are
    [L, H, N, max(ranks)] so the layer axis stays what every reader expects; layer l keeps its top
    ranks[l] singular pairs and zero columns after them. Zero columns decode to 0 under every row
    codec, so `a @ b^T` needs no per-layer logic, and zstd removes most of their bytes.
    """

    ranks: tuple[int, ...] = (16,)
    quant: str = "fp16"  # any of QUANTS

    @property
    def rank(self) -> int:
        return max(self.ranks)

    @property
    def is_schedule(self) -> bool:
        return len(self.ranks) > 1

    @property
    def spec(self) -> str:
        return f"lowrank:r={','.join(str(r) for r in self.ranks)}:{self.quant}"

    decodes = frozenset({"logits"})
    refusal = LOGIT_FACTORS_ONLY

    @property
    def serves_qk(self) -> bool:
        return {"q", "k"} <= self.decodes

    def layer_ranks(self, num_layers: int) -> tuple[int, ...]:
        if not self.is_schedule:
            return self.ranks * num_layers
        if len(self.ranks) != num_layers:
            raise SpecError(f"rank schedule {self.spec!r} gives {len(self.ranks)} ranks but {num_layers} layers are "
                             "cached: give one rank per cached layer (see --layers), e.g. r=4x6,16x6")
        return self.ranks

    def array_specs(self, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> list[ArraySpec]:
        self.layer_ranks(num_layers)
        if self.rank > head_dim:
            raise SpecError(f"lowrank rank r={self.rank} exceeds the teacher's head dim d={head_dim}")
        rows, codec = (num_layers, num_heads, num_tokens), RowCodec(self.quant)
        padded = " (zero columns past the layer's rank)" if self.is_schedule else ""
        return (codec.specs("a", rows, self.rank, "left factor" + padded)
                + codec.specs("b", rows, self.rank, "right factor" + padded))

    def factorize(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Float factors [B, L, H, N, max rank], each layer's columns past its rank zeroed. Truncating
        the top-r factorisation's columns is the rank-r factorisation: singular pairs are independent."""
        a, b = LowRankEncoding(self.rank, "fp32").factorize(q_BLHNd, k_BLHNd, scale)
        if self.is_schedule:
            ranks = torch.tensor(self.layer_ranks(a.shape[1]), device=a.device)
            keep_Lr = (torch.arange(self.rank, device=a.device) < ranks[:, None]).to(a.dtype)
            a, b = a * keep_Lr[:, None, None, :], b * keep_Lr[:, None, None, :]
        return a, b

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        a, b = self.factorize(q_BLHNd, k_BLHNd, scale)
        codec = RowCodec(self.quant)
        return {**codec.encode("a", a), **codec.encode("b", b)}

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 "logits" [B, L, H, N, N]; "q" / "k" raise `CannotDecode` (only A, B are stored)."""
        check_signal(self, what)
        return self.decode_logits(arrays, scale, device)

    def decode_logits(self, arrays: dict, scale: float, device="cpu") -> torch.Tensor:
        codec = RowCodec(self.quant)
        a = codec.decode("a", arrays, device, self.rank)
        b = codec.decode("b", arrays, device, self.rank)
        return a @ b.transpose(-1, -2)

    def to_json(self) -> dict:
        return {"kind": "lowrank", "rank": self.rank, "ranks": list(self.ranks), "quant": self.quant,
                "spec": self.spec}


# ---------------------------------------------------------------------------------------------- grammar

GRAMMAR = ("exact[:fp16|fp32|bf16|int8|int4|fp8]  or  lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8], "
           "RANKS = R (every layer) or R,R,... (one per cached layer; RxK repeats R K times)")


def parse_exact(spec: str, rest: list[str]):
    dtype = rest[0] if rest else "fp16"
    if len(rest) > 1 or dtype not in QUANTS:
        raise SpecError(f"bad encoding {spec!r}: exact takes one of {', '.join(QUANTS)} (grammar: {GRAMMAR})")
    return ExactEncoding(dtype) if dtype in _FLOAT_DTYPES else QuantExactEncoding(dtype)


def parse_ranks(spec: str, text: str) -> tuple[int, ...]:
    """`16` -> (16,); `4,4,8` -> (4, 4, 8); `4x2,8` -> (4, 4, 8)."""
    ranks: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[x*]\s*(\d+))?\s*", item)
        if not match:
            raise SpecError(f"bad encoding {spec!r}: rank {item!r} is not R or RxK (integers), e.g. r=16 or "
                             "r=4x6,16x6")
        rank, repeat = int(match.group(1)), int(match.group(2) or 1)
        if rank < 1 or repeat < 1:
            raise SpecError(f"bad encoding {spec!r}: ranks and repeats must be >= 1 (got {item.strip()!r})")
        ranks += [rank] * repeat
    return tuple(ranks)


def parse_lowrank(spec: str, rest: list[str]):
    ranks, quant = None, "fp16"
    for part in rest:
        if part.startswith("r="):
            ranks = parse_ranks(spec, part[2:])
        elif part in QUANTS:
            quant = part
        else:
            raise SpecError(f"bad encoding {spec!r}: unknown part {part!r} (expected r=RANKS or one of "
                             f"{', '.join(QUANTS)}; grammar: {GRAMMAR})")
    if ranks is None:
        raise SpecError(f"bad encoding {spec!r}: lowrank needs a rank r>=1, e.g. 'lowrank:r=16:int8' "
                         "or a schedule 'lowrank:r=4,4,8,8:int8'")
    if len(ranks) == 1 and quant in _CORE_LOWRANK_QUANTS:
        return LowRankEncoding(ranks[0], quant)
    return RankedLowRankEncoding(ranks, quant)

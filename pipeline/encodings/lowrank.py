"""The `lowrank` family: factors A, B [L, H, N, r] with A B^T ~= scale Q (K - mean K)^T (see `fit`),
through a row codec, with one rank for every layer or one per cached layer.

Specs: `lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8][:scale=token|row-pow2|token-pow2][:fit=subspace|eigh]`,
RANKS = `R` or `R,R,...` (`RxK` repeats R K times); `scale=` picks cheaper scales for int8 / int4 / fp8 rows
(`shared_scales.py`), `scale=row` (float16 per row) being the form without it; `fit=` names the fitter
of older stores (`fit.py`): `subspace` as stores of 2026-12-03, `eigh` as every store before them,
`fit=cholqr` being the form without it. A schedule's arrays are [L, H, N, max(ranks)] so the layer axis stays what every reader
expects; layer l keeps its top ranks[l] singular pairs and zero columns after them. Zero columns decode
to 0 under every row codec, so `a @ b^T` needs no per-layer logic, and zstd removes most of their bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.default import default_compression
from attncache.pipeline.encodings.codecs import QUANTS, ROW_CODECS
from attncache.pipeline.encodings.fit import CHOLQR, EIGH, FITTERS, Fitter, UnknownFit, fit_factors
from attncache.pipeline.encodings.protocol import ArraySpec, Encoding, check_signal
from attncache.pipeline.encodings.registry import grammar, register
from attncache.pipeline.encodings.rows import FloatRows, RowCodec
from attncache.pipeline.encodings.scaled import FirstInt8Rows, ScaledRows
from attncache.pipeline.encodings.shared_scales import SCHEMES, shared_scale_rows

LOGIT_FACTORS_ONLY = "stores only logit factors (A B^T ~= scale Q K^T), not Q and K"
# One rank with one of these codecs is the first low-rank encoding: its metadata has no "ranks" key and
# its int8 rows their first wording. Stores written so keep their cache id and metadata bytes.
_FIRST_FORM_CODECS = ("fp16", "fp32", "int8", "bf16")


@dataclass(frozen=True)
class LowRankEncoding(Encoding):
    ranks: tuple[int, ...] = (16,)
    codec: RowCodec = FloatRows("fp16")
    fitter: Fitter = CHOLQR
    decodes = frozenset({"logits"})
    refusal = LOGIT_FACTORS_ONLY

    @property
    def rank(self) -> int:
        return max(self.ranks)

    @property
    def is_schedule(self) -> bool:
        return len(self.ranks) > 1

    @property
    def spec(self) -> str:
        fit = "" if self.fitter == CHOLQR else f":fit={self.fitter.name}"
        return self._stored_spec + fit

    @property
    def _stored_spec(self) -> str:
        """The JSON's "spec": without the fitter, which has its own key (absent for `EIGH`, so its
        stores keep the metadata bytes and cache id they always had)."""
        return f"lowrank:r={','.join(str(r) for r in self.ranks)}:{self.codec.name}"

    def as_recorded(self, recorded: dict) -> "LowRankEncoding":
        """This encoding with the fitter `recorded` (a store's encoding JSON) names: "fitter" absent
        is `EIGH`, which wrote every store before the key existed; an unknown one reads but fits nothing."""
        name = str(recorded.get("fitter", EIGH.name))
        return replace(self, fitter=FITTERS.get(name) or UnknownFit(name))

    @property
    def _first_form(self) -> bool:
        return not self.is_schedule and self.codec.name in _FIRST_FORM_CODECS

    @property
    def _rows(self) -> RowCodec:
        return FirstInt8Rows() if self._first_form and self.codec.name == "int8" else self.codec

    @property
    def default_compression(self) -> str:
        return default_compression("lowrank", getattr(self.codec, "quant", self.codec.name))

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
        rows = (num_layers, num_heads, num_tokens)
        padded = " (zero columns past the layer's rank)" if self.is_schedule else ""
        return (self._rows.specs("a", rows, self.rank, "left factor" + padded)
                + self._rows.specs("b", rows, self.rank, "right factor" + padded))

    def factorize(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Float factors [B, L, H, N, max rank], each layer's columns past its rank zeroed. Truncating
        the top-r factorisation's columns is the rank-r factorisation: singular pairs are independent."""
        a, b = fit_factors(q_BLHNd, k_BLHNd, scale, self.rank, self.fitter)
        if self.is_schedule:
            ranks = torch.tensor(self.layer_ranks(a.shape[1]), device=a.device)
            keep_Lr = (torch.arange(self.rank, device=a.device) < ranks[:, None]).to(a.dtype)
            a, b = a * keep_Lr[:, None, None, :], b * keep_Lr[:, None, None, :]
        return a, b

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        a, b = self.factorize(q_BLHNd, k_BLHNd, scale)
        return {**self._rows.encode("a", a), **self._rows.encode("b", b)}

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 "logits" [B, L, H, N, N]; "q" / "k" raise `CannotDecode` (only A, B are stored)."""
        check_signal(self, what)
        a = self._rows.decode("a", arrays, device, self.rank)
        b = self._rows.decode("b", arrays, device, self.rank)
        return a @ b.transpose(-1, -2)

    def to_json(self) -> dict:
        fitted = {} if self.fitter == EIGH else {"fitter": self.fitter.name}  # the key is new: absent is EIGH
        spec = self._stored_spec
        if self._first_form:
            return {"kind": "lowrank", "rank": self.rank, "quant": self.codec.name, "spec": spec, **fitted}
        scheme = getattr(self.codec, "scheme", None)  # shared_scales.py: a new key, absent for per-row float16
        if scheme is not None:
            return {"kind": "lowrank", "rank": self.rank, "ranks": list(self.ranks), "quant": self.codec.quant,
                    "scale": scheme, "spec": spec, **fitted}
        return {"kind": "lowrank", "rank": self.rank, "ranks": list(self.ranks), "quant": self.codec.name,
                "spec": spec, **fitted}


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


@register("lowrank", grammar="lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8][:scale=token|row-pow2|token-pow2]"
                             "[:fit=subspace|eigh], RANKS = R (every layer) or R,R,... (one per cached layer; RxK repeats R "
                             "K times)")
def parse_lowrank(spec: str, rest: list[str]) -> LowRankEncoding:
    ranks, quant, scheme, fitter = None, "fp16", "row", CHOLQR
    for part in rest:
        if part.startswith("r="):
            ranks = parse_ranks(spec, part[2:])
        elif part in ROW_CODECS:
            quant = part
        elif part.startswith("scale=") and part[6:] in ("row", *SCHEMES):
            scheme = part[6:]
        elif part.startswith("fit="):
            if part[4:] not in FITTERS:
                raise SpecError(f"bad encoding {spec!r}: unknown low-rank fitter {part[4:]!r} (known: "
                                 f"{', '.join(FITTERS)}; a store that names another was made by another "
                                 "attncache version: it reads, but cannot be added to)")
            fitter = FITTERS[part[4:]]
        else:
            raise SpecError(f"bad encoding {spec!r}: unknown part {part!r} (expected r=RANKS or one of "
                             f"{', '.join(QUANTS)}; grammar: {grammar()})")
    if ranks is None:
        raise SpecError(f"bad encoding {spec!r}: lowrank needs a rank r>=1, e.g. 'lowrank:r=16:int8' "
                         "or a schedule 'lowrank:r=4,4,8,8:int8'")
    codec = ROW_CODECS[quant]
    if scheme == "row":
        return LowRankEncoding(ranks, codec, fitter)
    if not isinstance(codec, ScaledRows):
        raise SpecError(f"bad encoding {spec!r}: scale={scheme} needs scaled rows (int8, int4 or fp8), not {quant}")
    return LowRankEncoding(ranks, shared_scale_rows(codec, scheme), fitter)

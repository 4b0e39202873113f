"""The `exact` family: Q and K as the teacher's attention used them, through a row codec.

Serves every transfer mode, copy_q / copy_k too (Q and K come back exactly for fp32, to the codec's
precision otherwise). Specs: `exact` (fp16), `exact:fp32|fp16|bf16|int8|int4|fp8`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.default import default_compression
from attncache.pipeline.encodings.codecs import QUANTS, ROW_CODECS
from attncache.pipeline.encodings.protocol import SIGNALS, ArraySpec, Encoding, check_signal
from attncache.pipeline.encodings.registry import grammar, register
from attncache.pipeline.encodings.rows import FloatRows, RowCodec

QK_ENCODINGS = "exact:fp32, exact:fp16, exact:bf16, exact:int8, exact:fp8, exact:int4"
_MEANING = {"q": "queries after q_norm, before scale", "k": "keys after k_norm"}


@dataclass(frozen=True)
class ExactEncoding(Encoding):
    codec: RowCodec = FloatRows("fp16")
    decodes = frozenset(SIGNALS)
    refusal = ""

    @property
    def spec(self) -> str:
        return f"exact:{self.codec.name}"

    @property
    def default_compression(self) -> str:
        return default_compression("exact", self.codec.name)

    def array_specs(self, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> list[ArraySpec]:
        if head_dim % self.codec.values_per_byte:
            raise SpecError(f"{self.spec} packs two values per byte: the head dim d={head_dim} must be even")
        rows = (num_layers, num_heads, num_tokens)
        return [s for name in ("q", "k") for s in self.codec.specs(name, rows, head_dim, _MEANING[name])]

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        return {**self.codec.encode("q", q_BLHNd), **self.codec.encode("k", k_BLHNd)}

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 "q" / "k" [B, L, H, N, d] (int4 unpacked to d = 2 x stored bytes, which
        `array_specs` guarantees by refusing an odd d) or "logits" [B, L, H, N, N]."""
        check_signal(self, what)
        if what == "logits":
            q, k = self.decode(arrays, "q", scale, device), self.decode(arrays, "k", scale, device)
            return (q * scale) @ k.transpose(-1, -2)
        return self.codec.decode(what, arrays, device, self.codec.width(int(arrays[what].shape[-1])))

    def to_json(self) -> dict:
        return {"kind": "exact", "dtype": self.codec.name, "spec": self.spec}


@register("exact", grammar="exact[:fp16|fp32|bf16|int8|int4|fp8]")
def parse_exact(spec: str, rest: list[str]) -> ExactEncoding:
    dtype = rest[0] if rest else "fp16"
    if len(rest) > 1 or dtype not in ROW_CODECS:
        raise SpecError(f"bad encoding {spec!r}: exact takes one of {', '.join(QUANTS)} (grammar: {grammar()})")
    return ExactEncoding(ROW_CODECS[dtype])

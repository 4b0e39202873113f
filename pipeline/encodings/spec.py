"""Encoding specs: the text a user gives (`exact:fp16`, `lowrank:r=8:int8`, ...) to the encoding it names.

The core classes live in encodings/core.py, the others and the grammar in encodings/extra.py; this module
is the one place that knows both, so neither imports the other's parser.
"""
from __future__ import annotations

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.core import ExactEncoding, LowRankEncoding
from attncache.pipeline.encodings.extra import GRAMMAR, parse_exact, parse_lowrank

# The default of `precompute` and `plan`, chosen by students, not by KL alone (BENCHMARKS.md, "Which
# encoding"): students distilled from it and from exact:fp16 reached the same accuracy over 3 seeds,
# and it is 12.8x smaller than exact:fp16 on a 197-token teacher (13.5x after zstd).
DEFAULT_ENCODING = "lowrank:r=8:int8"

# the classes in encodings/extra.py (QuantExactEncoding, RankedLowRankEncoding) share this interface
Encoding = ExactEncoding | LowRankEncoding


def parse_encoding(spec: str) -> Encoding:
    """`exact[:fp16|fp32|bf16|int8|int4|fp8]` | `lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8]`, RANKS = `R`
    or one rank per cached layer `R,R,...` (`RxK` repeats R K times). The core specs give the core
    classes; the rest come from encodings/extra.py, which holds the grammar."""
    parts = [p.strip() for p in spec.strip().split(":") if p.strip()]
    if not parts:
        raise SpecError(f"empty encoding spec; expected e.g. 'exact:fp16' or 'lowrank:r=16:int8' ({GRAMMAR})")
    kind, rest = parts[0], parts[1:]
    if kind == "exact":
        return parse_exact(spec, rest)
    if kind == "lowrank":
        return parse_lowrank(spec, rest)
    raise SpecError(f"unknown encoding kind {kind!r} in {spec!r}; known: exact, lowrank ({GRAMMAR})")


def encoding_from_json(d: dict) -> Encoding:
    return parse_encoding(d["spec"])

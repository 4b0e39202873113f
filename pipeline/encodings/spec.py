"""Encoding specs: the text a user gives (`exact:fp16`, `lowrank:r=8:int8`, ...) to the encoding it names.

Parsing goes through `registry`; importing the family modules here registers every kind that ships
(as big_vision's `pp/builder.py` imports its ops), so callers need only this module.
"""
from __future__ import annotations

from attncache.pipeline.encodings import exact, lowrank  # noqa: F401  (they register "exact", "lowrank")
from attncache.pipeline.encodings.default import DEFAULT_ENCODING  # precompute's and plan's; why: `default`
from attncache.pipeline.encodings.protocol import Encoding
from attncache.pipeline.encodings.registry import parse

__all__ = ["DEFAULT_ENCODING", "Encoding", "encoding_from_json", "parse_encoding"]


def parse_encoding(spec: str) -> Encoding:
    """`exact[:fp16|fp32|bf16|int8|int4|fp8]` | `lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8][:scale=S]`,
    RANKS = `R` or one rank per cached layer `R,R,...` (`RxK` repeats R K times), S = token | row-pow2 |
    token-pow2 (int8 / int4 / fp8 rows only); a kind no family registered is refused in one line that
    lists the known ones."""
    return parse(spec)


def encoding_from_json(d: dict) -> Encoding:
    """The encoding a store's JSON records: its spec, and what the JSON holds beside it (`as_recorded`)."""
    return parse_encoding(d["spec"]).as_recorded(d)

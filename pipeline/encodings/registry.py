"""Encoding kinds by name: a spec's first word picks the family that parses the rest (as big_vision's
`pp/registry.py` does for preprocessing ops). A family is known only by registering, in its own module:

    @register("lowrank", grammar="lowrank:r=RANKS[:...]")
    def parse_lowrank(spec: str, rest: list[str]) -> Encoding: ...

`spec.py` imports the families, so `parse_encoding` knows every kind that ships.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.protocol import Encoding

Parser = Callable[[str, list[str]], Encoding]  # (the whole spec, for messages; the parts after the kind)


@dataclass(frozen=True)
class Family:
    parse: Parser
    grammar: str  # what the family's specs look like, for every message that explains the grammar


_FAMILIES: dict[str, Family] = {}


def register(kind: str, grammar: str) -> Callable[[Parser], Parser]:
    def add(parse: Parser) -> Parser:
        if kind in _FAMILIES:
            raise ValueError(f"encoding kind {kind!r} is registered twice")
        _FAMILIES[kind] = Family(parse, grammar)
        return parse
    return add


def kinds() -> tuple[str, ...]:
    """Known kinds, sorted: messages read the same whichever family module was imported first."""
    return tuple(sorted(_FAMILIES))


def grammar() -> str:
    return "  or  ".join(_FAMILIES[kind].grammar for kind in kinds())


def parse(spec: str) -> Encoding:
    parts = [p.strip() for p in spec.strip().split(":") if p.strip()]
    if not parts:
        raise SpecError(f"empty encoding spec; expected e.g. 'exact:fp16' or 'lowrank:r=16:int8' ({grammar()})")
    kind, rest = parts[0], parts[1:]
    if kind not in _FAMILIES:
        raise SpecError(f"unknown encoding kind {kind!r} in {spec!r}; known: {', '.join(kinds())} ({grammar()})")
    return _FAMILIES[kind].parse(spec, rest)

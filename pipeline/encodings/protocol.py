"""What every encoding is to its callers (the store, precompute, the trainer, plan, fidelity, show).

An encoding turns captured Q/K [B, L, H, N, d] into named numpy arrays whose leading axis is the
sample, and those arrays back into float32 tensors on the training device: logits [B, L, H, N, N]
(scale * Q K^T, up to a per-row constant that softmax ignores) and, where the arrays hold them, Q and K.
The families (`exact`, `lowrank`) implement this protocol; `registry` maps a spec's kind to its parser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from attncache.pipeline.encodings.default import DEFAULT_COMPRESSION

# What a consumer can ask an encoding to decode (`Encoding.decode(arrays, what, scale, device)`):
# "logits" [B, L, H, N, N] = scale * Q K^T up to a per-row constant, "q" / "k" [B, L, H, N, d].
SIGNALS = ("logits", "q", "k")


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


class Encoding(Protocol):
    """A family subclasses this to share the three members written in terms of the others."""

    decodes: frozenset[str]  # the SIGNALS its arrays give back
    refusal: str  # why it cannot decode the others, for `check_signal`'s one line

    @property
    def spec(self) -> str:
        """The canonical spec text: `parse_encoding(e.spec) == e`."""
        ...

    def array_specs(self, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> list[ArraySpec]:
        """The arrays `encode` returns per sample; raises `SpecError` for a teacher it cannot store."""
        ...

    def encode(self, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        ...

    def decode(self, arrays: dict, what: str, scale: float, device="cpu") -> torch.Tensor:
        """Float32 `what` (one of SIGNALS) on `device`: the one decode the trainer, verify, fidelity and
        show all call; raises `CannotDecode` for a signal outside `decodes`."""
        ...

    def to_json(self) -> dict:
        """The store's `encoding` metadata (part of the cache id): its keys and order are frozen."""
        ...

    def as_recorded(self, recorded: dict) -> "Encoding":
        """This encoding as the store JSON `recorded` (whose "spec" parsed to it) describes it: a family
        whose JSON holds more than its spec (the low-rank fitter) puts that back here."""
        return self

    @property
    def default_compression(self) -> str:
        """The store's compressor when the user gives none (`default.default_compression`)."""
        return DEFAULT_COMPRESSION

    def compression(self, given: str | None) -> str:
        """The compressor spec a store of this encoding is written with: `given`, else its own default
        (one rule for precompute, plan and bench fidelity)."""
        return self.default_compression if given is None else given

    @property
    def serves_qk(self) -> bool:
        return {"q", "k"} <= self.decodes

    def decode_logits(self, arrays: dict, scale: float, device="cpu") -> torch.Tensor:
        return self.decode(arrays, "logits", scale, device)

    def decode_qk(self, arrays: dict, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 Q and K [B, L, H, N, d]: what copy_q / copy_k modes need."""
        return self.decode(arrays, "q", 1.0, device), self.decode(arrays, "k", 1.0, device)

"""Row codecs: how one float tensor [..., w] (one row per (layer, head, token)) is stored as named arrays.

- fp32, fp16: the values; bf16: its raw bits as uint16 (numpy has no bfloat16) — `FloatRows` here;
- int8, int4, fp8: values and a float16 scale per row — `scaled.py`.
Every family stores its tensors through one of these, so a family says *what* it stores and a codec *how*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from attncache.pipeline.encodings.protocol import ArraySpec

_STORAGE = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


class RowCodec(Protocol):
    name: str  # the spec's word for it: fp32 fp16 bf16 int8 int4 fp8
    values_per_byte: int  # int4 packs two: a row of odd width needs a pad

    def specs(self, array: str, rows: tuple[int, ...], width: int, meaning: str) -> list[ArraySpec]: ...

    def encode(self, array: str, x: torch.Tensor) -> dict[str, np.ndarray]: ...

    def decode(self, array: str, arrays: dict, device, width: int) -> torch.Tensor:
        """Float32 [..., width] on `device`."""
        ...

    def width(self, stored: int) -> int:
        """Row width from the stored arrays' last axis."""
        ...


def as_tensor(a, device) -> torch.Tensor:
    """A stored array on `device`; uint16 (bfloat16 bits) comes back as int16, which torch can view."""
    if isinstance(a, np.ndarray):
        if a.dtype == np.uint16:
            a = a.view(np.int16)
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.to(device)


@dataclass(frozen=True)
class FloatRows:
    """The values themselves in a float format."""

    name: str  # fp32 | fp16 | bf16
    values_per_byte = 1

    def specs(self, array: str, rows: tuple[int, ...], width: int, meaning: str) -> list[ArraySpec]:
        return [ArraySpec(array, (*rows, width), _STORAGE[self.name], f"{meaning} ({self.name})")]

    def encode(self, array: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        if self.name == "bf16":
            return {array: x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)}
        return {array: x.to(getattr(torch, _STORAGE[self.name])).contiguous().cpu().numpy()}

    def decode(self, array: str, arrays: dict, device, width: int) -> torch.Tensor:
        stored = as_tensor(arrays[array], device)
        if self.name == "bf16":
            return stored.view(torch.bfloat16).float()  # the raw bits as int16 (see as_tensor)
        return stored.float()

    def width(self, stored: int) -> int:
        return stored

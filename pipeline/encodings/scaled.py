"""Row codecs with a float16 scale per row: x ~= v * s, s = max|x| / qmax (`<array>_scale`).

- int8: v = round(x / s) in [-127, 127] as int8, qmax 127.
- int4: v = round(x / s) in [-7, 7], qmax 7; two values per uint8 byte, offset by 8:
  byte i = (v[2i] + 8) | (v[2i+1] + 8) << 4, an odd width padded with one v = 0.
- fp8: x / s as float8 e4m3fn bits in uint8 (numpy has no fp8), qmax 448.
`storage_schema/README.md` has the same arithmetic for readers in other languages.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attncache.pipeline.encodings.finite import require_row_scale_fits
from attncache.pipeline.encodings.protocol import ArraySpec
from attncache.pipeline.encodings.rows import as_tensor

INT8_MAX = 127.0
_FP16_MIN_NORMAL, _FP16_MAX = 2.0 ** -14, 65504.0


def quantize_rows_int8(x_BLHNr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The row's max magnitude maps to 127; an all-zero row gets scale 1."""
    amax = x_BLHNr.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(torch.float16).float()
    q = torch.clamp(torch.round(x_BLHNr / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q.cpu().numpy(), scale.squeeze(-1).to(torch.float16).cpu().numpy()


def _row_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row scale [..., 1], rounded to float16 before use so that decoding with the stored scale
    is exactly what encoding assumed; all-zero rows get 1, tiny rows the smallest normal float16."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale.clamp(_FP16_MIN_NORMAL, _FP16_MAX).to(torch.float16).float()


def quantize_rows_int4(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[..., w] float -> packed uint8 [..., ceil(w / 2)] and float16 scales [...]."""
    scale = _row_scale(x, 7.0)
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
    scale = _row_scale(x, 448.0)
    v = torch.clamp(x.float() / scale, -448.0, 448.0).to(torch.float8_e4m3fn)
    return v.view(torch.uint8).cpu().numpy(), scale.squeeze(-1).to(torch.float16).cpu().numpy()


@dataclass(frozen=True)
class ScaledRows:
    """Values `<array>` and scales `<array>_scale`; a subclass names its format and its two steps."""

    name = ""
    qmax = 1.0  # largest stored magnitude
    stored_dtype = ""
    how = ""  # the values' meaning in the store's metadata, `{scale}` the scale array's name
    values_per_byte = 1

    def quantize(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def values(self, stored: torch.Tensor, width: int) -> torch.Tensor:
        raise NotImplementedError

    def value_meaning(self, array: str, meaning: str) -> str:
        return f"{meaning}: {self.how.format(scale=f'{array}_scale')}"

    def scale_meaning(self, array: str) -> str:
        return f"per-row scale of {array}"

    def specs(self, array: str, rows: tuple[int, ...], width: int, meaning: str) -> list[ArraySpec]:
        stored = (*rows, -(-width // self.values_per_byte))
        return [ArraySpec(array, stored, self.stored_dtype, self.value_meaning(array, meaning)),
                ArraySpec(f"{array}_scale", rows, "float16", self.scale_meaning(array))]

    def encode(self, array: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        require_row_scale_fits(f"{array} in {self.name} rows", x.float(), self.qmax)
        values, scales = self.quantize(x.float())
        return {array: values, f"{array}_scale": scales}

    def decode(self, array: str, arrays: dict, device, width: int) -> torch.Tensor:
        stored = as_tensor(arrays[array], device)
        scale = as_tensor(arrays[f"{array}_scale"], device)
        return self.values(stored, width).float() * scale.float().unsqueeze(-1)

    def width(self, stored: int) -> int:
        return stored * self.values_per_byte


@dataclass(frozen=True)
class Int8Rows(ScaledRows):
    name, qmax, stored_dtype, how = "int8", INT8_MAX, "int8", "int8, times {scale} per row"

    def quantize(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return quantize_rows_int8(x)

    def values(self, stored: torch.Tensor, width: int) -> torch.Tensor:
        return stored


@dataclass(frozen=True)
class FirstInt8Rows(Int8Rows):
    """int8 rows as `lowrank:r=R:int8` has always written them: the same bytes as `Int8Rows`, its own
    meaning text in the store's metadata, and no float16 range check before quantising (a scale past
    65504 becomes inf, which `finite.check_encoded` refuses after). Kept so that its stores' metadata
    stays byte-identical."""

    def value_meaning(self, array: str, meaning: str) -> str:
        return f"{meaning}, int8, times {array}_scale per row"

    def scale_meaning(self, array: str) -> str:
        return f"per-(token, head) scale of {array}"

    def encode(self, array: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        values, scales = quantize_rows_int8(x)
        return {array: values, f"{array}_scale": scales}


@dataclass(frozen=True)
class Int4Rows(ScaledRows):
    name, qmax, stored_dtype, values_per_byte = "int4", 7.0, "uint8", 2
    how = "int4 pairs packed low nibble first, offset 8, times {scale} per row"

    def quantize(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return quantize_rows_int4(x)

    def values(self, stored: torch.Tensor, width: int) -> torch.Tensor:
        return unpack_int4(stored, width)


@dataclass(frozen=True)
class Fp8Rows(ScaledRows):
    name, qmax, stored_dtype, how = "fp8", 448.0, "uint8", "float8 e4m3fn bits, times {scale} per row"

    def quantize(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return quantize_rows_fp8(x)

    def values(self, stored: torch.Tensor, width: int) -> torch.Tensor:
        return stored.view(torch.float8_e4m3fn)

"""Non-finite values never reach a store: checks on the teacher's Q/K and on what an encoding made of them.

A teacher whose Q/K exceed float16 (|x| > 65504) turns into inf under `exact:fp16`, an int8 row
scale (max / 127 stored as float16) into inf past ~8.3e6, and a readers' softmax of inf - inf into
NaN: the store would hold it, `verify` would hash it happily and a student would train to NaN.
Each check below raises `NonFiniteValues` naming the first bad sample (its index in the batch) and
layer (its index among the cached layers); precompute turns that into one line with the key and the
teacher's layer number (pipeline/precompute/job.py, `UnitAccumulator.add`).

Arrays have the sample axis first and the cached-layer axis second ([B, L, ...]), torch or numpy;
numpy uint16 arrays are bfloat16 bit patterns (the only uint16 arrays encodings write).
"""
from __future__ import annotations

import numpy as np
import torch

from attncache.pipeline.data.shards import redact

FP16_MAX = 65504.0
_BF16_EXPONENT = 0x7F80  # all ones: inf or NaN


class NonFiniteValues(ValueError):
    """`what` of sample `sample` (batch index), layer slot `layer` is inf/NaN or cannot be represented."""

    def __init__(self, what: str, sample: int, layer: int):
        super().__init__(f"{what} is not finite at batch index {sample}, cached layer {layer}")
        self.what, self.sample, self.layer = what, sample, layer

    def __reduce__(self):  # survives pickling across Ray and loader workers
        return (NonFiniteValues, (self.what, self.sample, self.layer))


class NonFiniteFactors(ValueError):
    """A job refused because the teacher's values, or their encoding, are not finite."""


def _bad_BL(x) -> np.ndarray | torch.Tensor:
    """[B, L] mask of (sample, layer) pairs holding any inf/NaN."""
    if not torch.is_tensor(x):
        as_torch = _as_torch_view(x)
        if as_torch is not None:
            return _bad_BL(as_torch).numpy()
    if torch.is_tensor(x):
        if not x.is_floating_point():
            return torch.zeros(x.shape[:2], dtype=torch.bool)
        return not_finite_rows(x.reshape(*x.shape[:2], -1))
    if x.dtype.kind == "u" and x.dtype.itemsize == 2:  # bfloat16 bits, in either byte order
        bad = (x & _BF16_EXPONENT) == _BF16_EXPONENT
    elif np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
    else:
        return np.zeros(x.shape[:2], dtype=bool)
    return bad.reshape(*x.shape[:2], -1).any(axis=-1)


def not_finite_rows(flat: torch.Tensor) -> torch.Tensor:
    """[...] True where a row (the last axis) of a float tensor holds inf or NaN. A sum is inf/NaN
    wherever any term is, and one reduction costs a fortieth of isfinite's full-size mask (3 against
    115 ms on a batch of ViT-S Q); a sum that overflowed on finite terms is told apart by the exact
    mask, computed for those rows only. 16-bit floats sum in float32: finite float16 terms can then
    never overflow it."""
    wide = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
    suspect = ~torch.isfinite(flat.sum(dim=-1, dtype=wide))
    if not bool(suspect.any()):
        return suspect
    bad = torch.zeros_like(suspect)
    bad[suspect] = ~torch.isfinite(flat[suspect]).all(dim=-1)
    return bad


def _as_torch_view(x: np.ndarray) -> torch.Tensor | None:
    """The numpy array as a torch tensor on the same memory, for the summed screen: numpy's float16
    isfinite converts every value (54 ms against 4 on an `exact:fp16` batch of ViT-S Q and K). None
    where torch cannot share the memory (read-only, non-native byte order, other dtypes)."""
    if not x.flags.writeable or not x.dtype.isnative:
        return None
    if x.dtype == np.uint16:  # bfloat16 bits
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    if x.dtype in (np.float16, np.float32, np.float64):
        return torch.from_numpy(x)
    return None


def require_finite(what: str, x) -> None:
    """Raise for the first (sample, layer) of `x` [B, L, ...] that holds inf or NaN."""
    size = x.numel() if torch.is_tensor(x) else x.size
    if x.ndim < 2 or size == 0:
        return
    bad = _bad_BL(x)
    if bool(bad.any()):
        raise NonFiniteValues(what, *first_bad(bad))


def first_bad(bad_BL) -> tuple[int, int]:
    if torch.is_tensor(bad_BL):
        b, layer = bad_BL.nonzero()[0].tolist()
        return int(b), int(layer)
    b, layer = np.argwhere(bad_BL)[0]
    return int(b), int(layer)


def require_row_scale_fits(what: str, x: torch.Tensor, qmax: float) -> None:
    """A per-row scale max|x| / qmax is stored as float16: past 65504 it would be clamped and the
    row's values clipped, a silently different attention. Raise for the first such row."""
    amax_BL = x.abs().reshape(*x.shape[:2], -1).amax(dim=-1) if x.numel() else None
    if amax_BL is not None and bool((amax_BL / qmax > FP16_MAX).any()):
        b, layer = first_bad(amax_BL / qmax > FP16_MAX)
        raise NonFiniteValues(f"{what} (its float16 row scale would exceed {FP16_MAX:g})", b, layer)


def check_encoded(encoded: dict[str, np.ndarray]) -> None:
    """Every float array (and bfloat16 bits) an encoding returned, in name order."""
    for name in sorted(encoded):
        require_finite(f"encoded array {name!r}", encoded[name])


def nonfinite_message(bad: NonFiniteValues, shard: str, key: str, layer: int, spec: str) -> str:
    """One line: where (shard, key, the teacher's layer), what, and what to do."""
    where = f"{redact(shard)}: sample {key!r}, teacher layer {layer}: {bad.what}"
    if bad.what.startswith("the teacher's"):
        return (f"{where} holds inf/NaN: the teacher itself is not finite on this image (damaged weights or "
                "checkpoint?), and no encoding can store that; nothing of this unit was written")
    return (f"{where} is not finite or not representable under --encoding {spec}: the teacher's values exceed its "
            "range; pick a representable encoding, e.g. --encoding exact:fp32 or exact:bf16 (float32 range); "
            "nothing of this unit was written")

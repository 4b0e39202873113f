"""Build tests/assets/encoding_pins.json: for every encoding spec, the bytes a store depends on.

Run as `python tests/assets/encoding_pins.py > tests/assets/encoding_pins.json`. The committed file was
made at commit 0b09c8e (before encodings became one package of families and row codecs), so
tests/test_encoding_pins.py checks that the refactored code writes what the original wrote. It uses
only names both versions have: `parse_encoding`, `factor_arrays` (the store's array metadata) and `cache_id`.
"""
from __future__ import annotations

import hashlib
import json
import platform

import numpy as np
import torch

QUANTS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
# every spec form the grammar accepts today: defaults, each row codec, odd widths, schedules, RxK
SPECS = (["exact", *(f"exact:{q}" for q in QUANTS), "lowrank:r=16", "lowrank:r=8x1", "lowrank:r=4x2",
          "lowrank:r=7:int4", " lowrank : r=8 : int8 "]
         + [f"lowrank:r=8:{q}" for q in QUANTS] + [f"lowrank:r=3,8:{q}" for q in QUANTS])
SHAPE = {"num_layers": 2, "num_heads": 3, "num_tokens": 17, "head_dim": 16}
SCALE = 16 ** -0.5
# lowrank factors come from float BLAS/LAPACK work: their hashes hold on the platform that made them
PLATFORM = f"{platform.machine()} torch {torch.__version__.split('+')[0]}"


def eigh_form(spec: str) -> str:
    """The spec of the fitter every pinned store used: low-rank stores were fitted by the full eigh
    until the subspace fitter became the default (`fit=eigh` names it; exact stores fit nothing).
    The pins were made with the specs as written; this checks the same bytes under today's name."""
    spec = spec.strip()
    return spec if spec.startswith("exact") else spec + ":fit=eigh"


def pinned_form(got: dict, spec: str) -> dict:
    """`got` (a fingerprint of `eigh_form(spec)`) with its spec as the pins wrote it (no `fit=`)."""
    return dict(got, spec=got["spec"].removesuffix(":fit=eigh"))


def qk() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shape = (2, SHAPE["num_layers"], SHAPE["num_heads"], SHAPE["num_tokens"], SHAPE["head_dim"])
    return torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) + 0.5


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        a = a.numpy() if torch.is_tensor(a) else a
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint(spec: str) -> dict:
    """What a store written with `spec` holds of it: metadata JSON text, cache id, array bytes, decodes."""
    from attncache.pipeline.encodings.spec import parse_encoding
    try:  # store/layout.py since the store split; store/cache.py at 0b09c8e, where the pins were made
        from attncache.pipeline.store.layout import factor_arrays
    except ImportError:
        from attncache.pipeline.store.cache import factor_arrays
    from attncache.pipeline.store.meta import cache_id

    enc = parse_encoding(spec)
    meta = {"schema_version": 1, "recipe": {"spec": "pin"}, "seed": 0, "layers": [0, 1], "heads": [0, 1, 2],
            "encoding": enc.to_json(), "compression": {"codec": "zstd"}, "compute": {"batch_size": 1},
            "teacher": {"name": "pin", "model_args": {}, "weights_sha256": "0" * 64}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k = qk()
        encoded = enc.encode(q, k, SCALE)
        decoded = {"logits": enc.decode(encoded, "logits", SCALE, "cpu")}
        if enc.serves_qk:
            decoded.update(q=enc.decode(encoded, "q", SCALE, "cpu"), k=enc.decode(encoded, "k", SCALE, "cpu"))
    finally:
        torch.set_num_threads(threads)
    return {"spec": enc.spec, "serves_qk": enc.serves_qk,
            "json": json.dumps(enc.to_json()), "cache_id": cache_id(meta),
            "arrays": json.dumps(factor_arrays(enc, *SHAPE.values())),
            "encoded": digest(encoded), "decoded": digest(decoded)}


def main() -> None:
    print(json.dumps({"made_at": "0b09c8e", "platform": PLATFORM,
                      "pins": {spec: fingerprint(spec) for spec in SPECS}}, indent=1))


if __name__ == "__main__":
    main()

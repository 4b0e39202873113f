"""Build tests/assets/shared_scale_pins.json: the bytes a store depends on for each shared-scale spec.

Run as `python -m tests.assets.shared_scale_pins > tests/assets/shared_scale_pins.json`. The same
fingerprint as encoding_pins.py (whose file stays as it was made at 0b09c8e); these specs are newer.
"""
from __future__ import annotations

import json

from tests.assets.encoding_pins import PLATFORM, fingerprint

NEW_SPECS = [f"lowrank:r={r}:{q}:scale={s}" for q in ("int8", "int4", "fp8")
             for s in ("token", "row-pow2", "token-pow2") for r in (8, 7)] + ["lowrank:r=3,8:int4:scale=token-pow2"]


def main() -> None:
    print(json.dumps({"platform": PLATFORM, "pins": {spec: fingerprint(spec) for spec in NEW_SPECS}}, indent=1))


if __name__ == "__main__":
    main()

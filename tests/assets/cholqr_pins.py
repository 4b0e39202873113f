"""Build tests/assets/cholqr_pins.json: the bytes a store depends on for every low-rank spec fitted by
the CholeskyQR fitter, the default since it replaced the subspace fitter (whose stores subspace_pins.json
keeps pinning under `fit=subspace`, and encoding_pins.json and shared_scale_pins.json the eigh's under
`fit=eigh`).

Run as `python -m tests.assets.cholqr_pins > tests/assets/cholqr_pins.json`. The factor bits are
compared on the machine kind that made them (`machine`, as machine_pins.py names kinds) and skipped on
others; the metadata text and cache ids are compared everywhere.
"""
from __future__ import annotations

import json

from tests.assets.encoding_pins import PLATFORM, fingerprint
from tests.assets.machine_pins import KEY
from tests.assets.subspace_pins import LOWRANK_SPECS


def main() -> None:
    print(json.dumps({"platform": PLATFORM, "machine": KEY, "pins": {spec: fingerprint(spec) for spec in LOWRANK_SPECS}}, indent=1))


if __name__ == "__main__":
    main()

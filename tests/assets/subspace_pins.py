"""Build tests/assets/subspace_pins.json: the bytes a store depends on for every low-rank spec fitted by
the subspace fitter, the default from when it replaced the full eigh (whose stores encoding_pins.json
and shared_scale_pins.json keep pinning under `fit=eigh`) until the CholeskyQR fitter (cholqr_pins.py).
The file keys and writes the specs as they were written then, without `fit=`; today they need
`fit=subspace`, which this adds to fit them and removes from the `spec` it writes.

Run as `python -m tests.assets.subspace_pins > tests/assets/subspace_pins.json`. The factor bits are
compared on the machine kind that made them (`machine`, as machine_pins.py names kinds) and skipped on
others, whose BLAS kernels end in other bits, until a run there records them; the metadata text and
cache ids are compared everywhere.
"""
from __future__ import annotations

import json

from tests.assets.encoding_pins import PLATFORM, SPECS, fingerprint
from tests.assets.machine_pins import KEY
from tests.assets.shared_scale_pins import NEW_SPECS

LOWRANK_SPECS = [s for s in SPECS if not s.strip().startswith("exact")] + NEW_SPECS


def main() -> None:
    pins = {}
    for spec in LOWRANK_SPECS:
        got = fingerprint(spec + ":fit=subspace")
        pins[spec] = dict(got, spec=got["spec"].removesuffix(":fit=subspace"))
    print(json.dumps({"platform": PLATFORM, "machine": KEY, "pins": pins}, indent=1))


if __name__ == "__main__":
    main()

"""Bit pins of float work whose last bits depend on the CPU (MKL picks its kernels by vendor and ISA).

The pins written in the tests were made on the project's first machine kind; machine_pins.json adds
the bits measured on other kinds (2026-12-02: an AMD EPYC with AVX-512, where MKL's float64 LAPACK,
the fixture teacher's weights and the optimiser's float work end in other bits; an AMD EPYC with
AVX2 only, where the old default store's factor bytes do), keyed by what /proc/cpuinfo says the CPU
is and its widest vector ISA; only bits that differ from the first kind's are kept. Every comparison
is bit-exact against a measured result. To pin a new kind, run the pinned tests once on it with
ATTNCACHE_RECORD_MACHINE_PINS=1: each new result is written and its test fails (a recording run is
never green), so the file changes only by a reviewed commit, as the first kind's pins did.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

FILE = Path(__file__).with_name("machine_pins.json")


def _cpu() -> str:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    # a virtual machine may name only the brand ("AMD EPYC") for CPUs of several generations whose
    # kernels differ; the widest vector ISA tells them apart (MKL dispatches on it)
    flags = set(fields.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return f"{fields.get('vendor_id', '?')} {fields.get('model name', '?')} {isa}"


KEY = f"{platform.machine()} {_cpu()}"


def check(name: str, got, first, file: Path = FILE) -> None:
    """Assert `got` is the exact result one known machine kind gives for `name`: the first kind's pin
    `first` or one recorded in the pins file. A change of the code's bits gives neither (the CPU
    strings of two kinds can be alike, so the kind is not trusted to say which one applies)."""
    pins = json.loads(file.read_text()) if file.exists() else {}
    known = [first] + [kind[name] for kind in pins.values() if name in kind]
    if got in known:
        return
    if os.environ.get("ATTNCACHE_RECORD_MACHINE_PINS") == "1":
        pins.setdefault(KEY, {})[name] = got
        file.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        raise AssertionError(f"{name} on {KEY}: recorded {got} in {file.name}; review it, re-run without "
                             "ATTNCACHE_RECORD_MACHINE_PINS")
    raise AssertionError(f"{name} on {KEY}: {got} is none of the known machine kinds' bits {known}")

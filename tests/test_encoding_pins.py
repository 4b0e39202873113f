"""Encodings as one package of families and row codecs: what a store holds of an encoding is what it
held before (pins made at 0b09c8e, tests/assets/encoding_pins.py), and a kind is known only by registering.

The metadata text, the cache id and the array specs are pure functions of the spec, pinned on any
machine. Encoded arrays of `exact` are casts and IEEE rounding, pinned on any machine too; low-rank
factors and every decoded logit go through BLAS/LAPACK, whose float results hold on the platform that
made the pins (the file names it), so there they are compared bit for bit and elsewhere skipped.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings import registry
from attncache.pipeline.encodings.protocol import ArraySpec, Encoding, check_signal
from attncache.pipeline.encodings.spec import parse_encoding
from attncache.pipeline.store.layout import factor_arrays

from tests.assets.encoding_pins import PLATFORM, SPECS, eigh_form, fingerprint, pinned_form
from tests.assets.machine_pins import KEY as MACHINE, check

PINNED = json.loads((Path(__file__).parent / "assets" / "encoding_pins.json").read_text())
PINS = PINNED["pins"]


def test_the_pins_cover_every_spec_form_and_were_made_before_the_refactor():
    assert PINNED["made_at"] == "0b09c8e" and list(PINS) == list(SPECS)
    assert {p["spec"].split(":")[1] if p["spec"].startswith("exact") else p["spec"].rsplit(":", 1)[1]
            for p in PINS.values()} == {"fp32", "fp16", "bf16", "int8", "int4", "fp8"}


@pytest.mark.parametrize("spec", SPECS)
def test_metadata_text_cache_id_and_array_specs_are_the_pinned_bytes(spec):
    got, pin = pinned_form(fingerprint(eigh_form(spec)), spec), PINS[spec]
    for field in ("spec", "serves_qk", "json", "cache_id", "arrays"):
        assert got[field] == pin[field], field


@pytest.mark.parametrize("spec", SPECS)
def test_encoded_and_decoded_arrays_are_the_pinned_bits(spec):
    got, pin = pinned_form(fingerprint(eigh_form(spec)), spec), PINS[spec]
    if spec.strip().startswith("exact"):
        assert got["encoded"] == pin["encoded"]
    if PLATFORM != PINNED["platform"]:
        pytest.skip(f"BLAS/LAPACK results pinned on {PINNED['platform']}, this is {PLATFORM}")
    check(f"encoding/{spec}", [got["encoded"], got["decoded"]], [pin["encoded"], pin["decoded"]])


@dataclass(frozen=True)
class DenseLogits(Encoding):
    """A family made up for the test: the logits themselves, float32 (N^2 per head)."""

    decodes = frozenset({"logits"})
    refusal = "stores only logits"

    @property
    def spec(self) -> str:
        return "dense"

    def array_specs(self, num_layers, num_heads, num_tokens, head_dim):
        return [ArraySpec("logits", (num_layers, num_heads, num_tokens, num_tokens), "float32", "scale Q K^T")]

    def encode(self, q_BLHNd, k_BLHNd, scale):
        return {"logits": ((q_BLHNd * scale) @ k_BLHNd.transpose(-1, -2)).numpy()}

    def decode(self, arrays, what, scale, device="cpu"):
        check_signal(self, what)
        return torch.from_numpy(arrays["logits"]).to(device)

    def to_json(self):
        return {"kind": "dense", "spec": self.spec}


def test_a_kind_is_known_only_by_registering(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # the registration ends with the test
    shipped = registry.grammar()
    with pytest.raises(SpecError) as refused:
        parse_encoding("dense")
    assert str(refused.value) == f"unknown encoding kind 'dense' in 'dense'; known: exact, lowrank ({shipped})"

    @registry.register("dense", grammar="dense")
    def parse_dense(spec, rest):
        if rest:
            raise SpecError(f"bad encoding {spec!r}: dense takes nothing after the kind")
        return DenseLogits()

    enc = parse_encoding(" dense ")
    assert enc == DenseLogits() and registry.kinds() == ("dense", "exact", "lowrank")
    assert factor_arrays(enc, 2, 3, 5, 4)["logits"]["trailing_shape"] == [2, 3, 5, 5]  # the store takes it as is
    q, k = torch.randn(1, 2, 3, 5, 4), torch.randn(1, 2, 3, 5, 4)
    assert np.array_equal(enc.decode_logits(enc.encode(q, k, 0.5), 0.5).numpy(), enc.encode(q, k, 0.5)["logits"])
    assert not enc.serves_qk  # the protocol's shared members work for any family
    with pytest.raises(SpecError) as refused:
        parse_encoding("svd:r=4")
    assert str(refused.value) == (f"unknown encoding kind 'svd' in 'svd:r=4'; known: dense, exact, lowrank "
                                  f"(dense  or  {shipped})")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("exact", grammar="exact")(parse_dense)
    assert parse_encoding("exact:int8").spec == "exact:int8"  # the shipped kinds stay


def test_the_shipped_grammar_reads_as_before():
    assert registry.kinds() == ("exact", "lowrank")
    # issue 14 added the scale part (shared_scales.py), issue 18 the fit part (fit.py); every form before
    # them reads as it did (pins above, under fit=eigh)
    assert registry.grammar() == ("exact[:fp16|fp32|bf16|int8|int4|fp8]  or  lowrank:r=RANKS[:fp16|fp32|bf16|int8|"
                                  "int4|fp8][:scale=token|row-pow2|token-pow2][:fit=subspace|eigh], RANKS = R (every layer) or R,R,... "
                                  "(one per cached layer; RxK repeats R K times)")


SUBSPACE_PINNED = json.loads((Path(__file__).parent / "assets" / "subspace_pins.json").read_text())
CHOLQR_PINNED = json.loads((Path(__file__).parent / "assets" / "cholqr_pins.json").read_text())


@pytest.mark.parametrize("spec", list(SUBSPACE_PINNED["pins"]))
def test_the_subspace_fitters_stores_are_their_pinned_bytes_and_name_their_fitter(spec):
    """The subspace fitter's stores (the default of 2026-12-03, `fit=subspace` since): the JSON names the
    fitter, so their cache id is never an eigh store's, and the factors are the bits pinned when the
    fitter became the default (pinned under the spec without `fit=`, which then meant it)."""
    got, pin = fingerprint(spec + ":fit=subspace"), SUBSPACE_PINNED["pins"][spec]
    assert got["spec"] == pin["spec"] + ":fit=subspace"
    for field in ("serves_qk", "json", "cache_id", "arrays"):
        assert got[field] == pin[field], field
    assert json.loads(got["json"])["fitter"] == "subspace"
    assert got["cache_id"] != pinned_form(fingerprint(eigh_form(spec)), spec)["cache_id"]
    if (PLATFORM, MACHINE) != (SUBSPACE_PINNED["platform"], SUBSPACE_PINNED["machine"]):
        pytest.skip(f"factor bits pinned on {SUBSPACE_PINNED['machine']} ({SUBSPACE_PINNED['platform']}), this is "
                    f"{MACHINE} ({PLATFORM})")
    assert [got["encoded"], got["decoded"]] == [pin["encoded"], pin["decoded"]]


@pytest.mark.parametrize("spec", list(CHOLQR_PINNED["pins"]))
def test_the_cholqr_fitters_stores_are_their_pinned_bytes_and_name_their_fitter(spec):
    """New low-rank stores (the CholeskyQR fitter, the default): the JSON names the fitter, so the cache
    id is neither a subspace nor an eigh store's. At the pins' head dim 16 every rank takes the eigh
    (p > 0.4 d), as in the subspace fitter: the same factor bits as `fit=subspace` on any machine."""
    got, pin = fingerprint(spec), CHOLQR_PINNED["pins"][spec]
    for field in ("spec", "serves_qk", "json", "cache_id", "arrays"):
        assert got[field] == pin[field], field
    assert json.loads(got["json"])["fitter"] == "cholqr"
    subspace = fingerprint(spec + ":fit=subspace")
    assert got["cache_id"] not in (subspace["cache_id"], pinned_form(fingerprint(eigh_form(spec)), spec)["cache_id"])
    assert [got["encoded"], got["decoded"]] == [subspace["encoded"], subspace["decoded"]]
    if (PLATFORM, MACHINE) != (CHOLQR_PINNED["platform"], CHOLQR_PINNED["machine"]):
        pytest.skip(f"factor bits pinned on {CHOLQR_PINNED['machine']} ({CHOLQR_PINNED['platform']}), this is "
                    f"{MACHINE} ({PLATFORM})")
    assert [got["encoded"], got["decoded"]] == [pin["encoded"], pin["decoded"]]


def test_a_store_json_without_a_fitter_is_read_as_the_eigh_fitters_and_an_unknown_fitter_reads_but_fits_nothing():
    from attncache.pipeline._util.spec_error import SpecError as Refused
    from attncache.pipeline.encodings.fit import CHOLQR, EIGH, SUBSPACE
    from attncache.pipeline.encodings.spec import encoding_from_json

    old = json.loads(PINS["lowrank:r=8:int8"]["json"])  # a store written before the key existed
    assert "fitter" not in old and encoding_from_json(old).fitter == EIGH
    assert encoding_from_json(old).spec == "lowrank:r=8:int8:fit=eigh"
    assert encoding_from_json(old).to_json() == old  # so a resume under fit=eigh matches its metadata
    new = parse_encoding("lowrank:r=8:int8")
    assert new.fitter == CHOLQR and encoding_from_json(new.to_json()) == new
    day = parse_encoding("lowrank:r=8:int8:fit=subspace")  # a store of 2026-12-03
    assert day.fitter == SUBSPACE and encoding_from_json(day.to_json()).spec == "lowrank:r=8:int8:fit=subspace"
    future = dict(new.to_json(), fitter="lanczos-v9")
    enc = encoding_from_json(future)
    q, k = torch.randn(1, 1, 2, 17, 16), torch.randn(1, 1, 2, 17, 16)
    arrays = new.encode(q, k, 0.25)
    assert torch.equal(enc.decode_logits(arrays, 0.25), new.decode_logits(arrays, 0.25))  # reads
    with pytest.raises(Refused, match="fitter 'lanczos-v9'.*not add to it"):
        enc.encode(q, k, 0.25)

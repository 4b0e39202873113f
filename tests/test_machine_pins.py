"""The per-machine bit pins (tests/assets/machine_pins.py): exact against a known kind, never green while recording."""
import json

import pytest

from tests.assets import machine_pins


def test_only_a_known_kinds_exact_bits_pass(tmp_path):
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"other kind": {"x": "bits-b"}}))
    machine_pins.check("x", "bits-a", "bits-a", pins)  # the first kind's pin
    machine_pins.check("x", "bits-b", "bits-a", pins)  # another kind's recorded pin
    with pytest.raises(AssertionError, match="bits-c is none of the known machine kinds' bits"):
        machine_pins.check("x", "bits-c", "bits-a", pins)
    with pytest.raises(AssertionError):
        machine_pins.check("y", "bits-b", "bits-a", pins)  # a pin of another name does not serve
    machine_pins.check("x", "bits-a", "bits-a", tmp_path / "missing.json")  # no file: the first kind's pins


def test_recording_writes_the_new_bits_and_fails_and_leaves_known_bits_alone(tmp_path, monkeypatch):
    pins = tmp_path / "pins.json"
    monkeypatch.setenv("ATTNCACHE_RECORD_MACHINE_PINS", "1")
    machine_pins.check("x", "bits-a", "bits-a", pins)
    assert not pins.exists()  # the first kind's bits are not copied
    with pytest.raises(AssertionError, match="recorded bits-c"):
        machine_pins.check("x", "bits-c", "bits-a", pins)
    assert json.loads(pins.read_text()) == {machine_pins.KEY: {"x": "bits-c"}}
    monkeypatch.delenv("ATTNCACHE_RECORD_MACHINE_PINS")
    machine_pins.check("x", "bits-c", "bits-a", pins)

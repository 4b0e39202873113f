"""Bad caches: each kind of damage is named by `verify`, and `train` refuses it before its first step
(quick checks: schema, metadata identity, every marker, files present) or, for bytes that changed
under a valid marker, when the loader reads the unit (sha256 against the marker), never training on it."""
import json
import shutil

import pytest

from attncache.pipeline.store.meta import cache_id
from relhelp import FAST, TEACHER_ARGS, invoke, noise_shards

STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
           "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3"]
FACTOR_FILE = "views/0/factors/a/c/1/0/0/0/0"  # unit (view 0, shard 1): its first factor array's shard file


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    data = noise_shards(root / "d", 32, shard_size=16, seed=3)
    result = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", root / "clean.zarr")
    assert result.exit_code == 0, result.output
    return data, root / "clean.zarr"


def _flip(store):
    raw = bytearray((store / FACTOR_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (store / FACTOR_FILE).write_bytes(bytes(raw))


def _truncate(store):
    raw = (store / FACTOR_FILE).read_bytes()
    (store / FACTOR_FILE).write_bytes(raw[:len(raw) // 2])


def _edit_meta(store, change, recompute_id=False):
    doc = json.loads((store / "zarr.json").read_text())
    meta = doc["attributes"]["attncache"]
    change(meta)
    if recompute_id:  # a careful forger: the store's id agrees, but its markers still name the old one
        meta["cache_id"] = cache_id(meta)
    (store / "zarr.json").write_text(json.dumps(doc))


DAMAGE = {  # name: (how, what verify says, what train says, when train stops)
    "bit flip": (_flip, f"checksum mismatch in {FACTOR_FILE}", "CacheCorrupt", "read"),
    "truncated shard file": (_truncate, f"checksum mismatch in {FACTOR_FILE}", "CacheCorrupt", "read"),
    "deleted shard file": (lambda s: (s / FACTOR_FILE).unlink(), f"missing in {FACTOR_FILE}",
                           f"missing {FACTOR_FILE}", "start"),
    "deleted marker": (lambda s: (s / "units/0/000001.json").unlink(), "missing (no marker", "no marker", "start"),
    "garbage marker": (lambda s: (s / "units/0/000000.json").write_text("{not json"), "marker is not JSON",
                       "marker is not JSON", "start"),
    "teacher edited": (lambda s: _edit_meta(s, lambda m: m["teacher"].update(name="vit_large_patch16_224")),
                       "metadata edited after creation", "metadata edited after creation", "start"),
    "recipe edited, id recomputed": (
        lambda s: _edit_meta(s, lambda m: m["recipe"].update(spec="eval"), recompute_id=True),
        "marker belongs to another cache", "marker belongs to another cache", "start"),
    "schema from the future": (lambda s: _edit_meta(s, lambda m: m.update(schema_version=99)),
                               "schema_version 99", "schema_version 99", "start"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_the_damage_and_train_refuses_it(damage, clean, tmp_path):
    data, source = clean
    store = tmp_path / "bad.zarr"
    shutil.copytree(source, store)
    how, verify_says, train_says, when = DAMAGE[damage]
    how(store)
    verified = invoke("verify", store)
    assert verified.exit_code == 1 and verify_says in verified.output, verified.output
    if when == "read":
        assert "view 0 shard 000001" in verified.output and "1/2 units ok" in verified.output
    run = tmp_path / "run"
    trained = invoke("train", "--data", data, "--cache", store, "--out", run, *STUDENT, "--max-steps", "8",
                     "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet")
    assert trained.exit_code == 1 and train_says in trained.output, trained.output
    assert "Traceback" not in trained.output
    if when == "start":  # refused before the first step: no run directory at all
        assert not run.exists()
    else:  # caught when the damaged unit is read, before any of its samples reach a step
        assert "view 0 shard 000001" in trained.output and not (run / "model.safetensors").exists()


def test_the_clean_store_verifies_and_trains(clean, tmp_path):
    data, store = clean
    assert invoke("verify", store).exit_code == 0
    trained = invoke("train", "--data", data, "--cache", store, "--out", tmp_path / "run", *STUDENT, "--max-steps",
                     "8", "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet")
    assert trained.exit_code == 0, trained.output


def test_show_and_store_fidelity_refuse_a_damaged_unit_and_still_read_an_intact_one(clean, tmp_path):
    """`show` and `bench fidelity STORE` read units through their markers as training does: a flipped
    byte is one line naming the unit and the remedy (no figure, no score), while a key of an intact
    unit of the same store still draws."""
    _, source = clean
    store = tmp_path / "bad.zarr"
    shutil.copytree(source, store)
    _flip(store)  # view 0, shard 1
    keys = invoke("inspect", store, "--keys").output.split()
    assert len(keys) == 32
    first, damaged = keys[0], keys[16]  # shard 0 (intact), shard 1 (damaged)
    png = tmp_path / "a.png"
    refused = invoke("show", store, "--key", damaged, "--out", png)
    assert refused.exit_code == 1, refused.output
    line = refused.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "view 0 shard 1 fails its integrity check" in line and f"checksum mismatch in {FACTOR_FILE}" in line
    assert "--repair" in line and not png.exists()
    drawn = invoke("show", store, "--key", first, "--out", png)
    assert drawn.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG", drawn.output
    scored = invoke("bench", "fidelity", store, "--samples", "32", "--json")
    assert scored.exit_code == 1 and "view 0 shard 1 fails its integrity check" in scored.output, scored.output
    assert "Traceback" not in scored.output and '"kl_mean"' not in scored.output

"""Never loses work (issue 17, items 2 and 3): a re-run of `precompute` on a store whose root
metadata is lost, unreadable or edited changes nothing and says how to repair; `--repair` restores
the metadata (only when the units' markers show the same job wrote them) and rewrites damaged units,
leaving a store byte-identical to one never damaged; the advice `verify` and `train` print names it."""
import json
import shutil

import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, store_files

REPAIR_ADVICE = "re-run the same `attncache precompute` command with --repair"  # pipeline.store.integrity's

STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
           "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3"]


def unit_file(shard: int, array: str = "factors/a") -> str:
    return f"views/0/{array}/c/{shard}/0/0/0/0" if array.startswith("factors") else f"views/0/{array}/c/{shard}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    data = noise_shards(root / "d", 32, shard_size=8, seed=7)
    result = invoke(*precompute_args(data, root / "clean.zarr"))
    assert result.exit_code == 0, result.output
    return data, root / "clean.zarr"


def precompute_args(data, out, *extra):
    return ["precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", out, *extra]


def copy(clean, tmp_path):
    data, source = clean
    store = tmp_path / "s.zarr"
    shutil.copytree(source, store)
    return data, store


def _root(store):
    return json.loads((store / "zarr.json").read_text())


def _attrs_emptied(store):
    doc = _root(store)
    doc["attributes"] = {}
    (store / "zarr.json").write_text(json.dumps(doc))


def _garbage(store):
    (store / "zarr.json").write_text("{not json")


def _deleted(store):
    (store / "zarr.json").unlink()


def _field_dropped(store):
    doc = _root(store)
    del doc["attributes"]["attncache"]["tokens"]
    (store / "zarr.json").write_text(json.dumps(doc))


def _scale_edited(store):
    doc = _root(store)
    doc["attributes"]["attncache"]["teacher"]["scale"] *= 20
    (store / "zarr.json").write_text(json.dumps(doc))


LOST = {"attributes emptied": _attrs_emptied, "zarr.json not JSON": _garbage, "zarr.json deleted": _deleted,
        "a metadata field dropped": _field_dropped, "teacher.scale edited": _scale_edited}


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("damage", list(LOST))
def test_a_rerun_on_lost_metadata_changes_nothing_and_says_how_to_repair(damage, clean, tmp_path):
    data, store = copy(clean, tmp_path)
    LOST[damage](store)
    before = store_files(store)
    result = invoke(*precompute_args(data, store))
    assert result.exit_code == 1, result.output
    line = one_line(result.output)
    assert "nothing was changed" in line and REPAIR_ADVICE in line, line
    assert differing(before, store_files(store)) == []  # not one byte deleted or rewritten


@pytest.mark.parametrize("damage", list(LOST))
def test_repair_restores_lost_metadata_byte_identical(damage, clean, tmp_path):
    data, store = copy(clean, tmp_path)
    LOST[damage](store)
    result = invoke(*precompute_args(data, store, "--repair"))
    assert result.exit_code == 0, result.output
    assert "units: 0 processed, 4 already done" in result.output
    assert differing(store_files(clean[1]), store_files(store)) == []
    verified = invoke("verify", store)
    assert verified.exit_code == 0 and "4/4 units ok" in verified.output, verified.output


def test_repair_will_not_restore_metadata_from_another_job(clean, tmp_path):
    data, store = copy(clean, tmp_path)
    _attrs_emptied(store)
    before = store_files(store)
    result = invoke(*precompute_args(data, store, "--repair", "--seed", "1"))
    assert result.exit_code == 1, result.output
    line = one_line(result.output)
    assert "--repair cannot restore it: 0 of the store's 4 unit markers" in line and "nothing was changed" in line
    assert differing(before, store_files(store)) == []


def test_another_jobs_store_is_refused_naming_the_field(clean, tmp_path):
    data, store = copy(clean, tmp_path)
    before = store_files(store)
    result = invoke(*precompute_args(data, store, "--seed", "1"))
    assert result.exit_code == 1 and "seed: store has 0, this run has 1" in one_line(result.output)
    assert differing(before, store_files(store)) == []


def _flip(store, rel):
    raw = bytearray((store / rel).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (store / rel).write_bytes(bytes(raw))


def _truncate(store, rel):
    raw = (store / rel).read_bytes()
    (store / rel).write_bytes(raw[:len(raw) // 2])


def test_flip_delete_truncate_then_repair_is_byte_identical(clean, tmp_path):
    data, store = copy(clean, tmp_path)
    _flip(store, unit_file(0))
    (store / unit_file(1, "key")).unlink()
    _truncate(store, unit_file(2, "factors/b"))
    verified = invoke("verify", store)
    assert verified.exit_code == 1 and "1/4 units ok" in verified.output
    assert f"to repair: {REPAIR_ADVICE}" in verified.output
    trained = invoke("train", "--data", data, "--cache", store, "--out", tmp_path / "run", *STUDENT, "--max-steps",
                     "2", "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet")
    assert trained.exit_code == 1 and REPAIR_ADVICE in one_line(trained.output), trained.output
    plain = invoke(*precompute_args(data, store))  # the cheap check: sizes catch the deleted and truncated file
    assert plain.exit_code == 0 and "units: 2 processed, 2 already done" in plain.output, plain.output
    repaired = invoke(*precompute_args(data, store, "--repair"))  # every byte: the flipped one too
    assert repaired.exit_code == 0 and "units: 1 processed, 3 already done" in repaired.output, repaired.output
    assert differing(store_files(clean[1]), store_files(store)) == []
    assert invoke("verify", store).exit_code == 0


def test_repair_of_an_intact_store_changes_nothing(clean, tmp_path):
    data, store = copy(clean, tmp_path)
    before = {p: b for p, b in store_files(store).items()}
    repaired = invoke(*precompute_args(data, store, "--repair"))
    assert repaired.exit_code == 0 and "units: 0 processed, 4 already done" in repaired.output
    assert differing(before, store_files(store)) == []


def test_a_path_holding_other_files_is_refused_untouched(clean, tmp_path):
    data, _ = clean
    out = tmp_path / "mine"
    (out / "views").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "views" / "photo.bin").write_bytes(b"\x00" * 10)
    before = store_files(out)
    result = invoke(*precompute_args(data, out))
    assert result.exit_code == 1 and "nothing was changed" in one_line(result.output), result.output
    assert differing(before, store_files(out)) == []


def test_a_foreign_zarr_group_with_data_is_refused_untouched(clean, tmp_path):
    import numpy as np
    import zarr

    data, _ = clean
    out = tmp_path / "foreign.zarr"
    group = zarr.open_group(out, mode="w", zarr_format=3)
    group.create_array("views/0/label", shape=(4,), dtype="int64", chunks=(4,))[:] = np.arange(4)
    before = store_files(out)
    result = invoke(*precompute_args(data, out))
    assert result.exit_code == 1 and "nothing was changed" in one_line(result.output), result.output
    assert differing(before, store_files(out)) == []


def test_a_store_path_that_is_a_file_is_refused_in_one_line(clean, tmp_path):
    data, _ = clean
    out = tmp_path / "file.zarr"
    out.write_text("x")
    result = invoke(*precompute_args(data, out))
    assert result.exit_code == 2, result.output  # click refuses it before any work
    assert one_line(result.output.split("\n\n")[-1]).endswith(f"Invalid value for '--out': Directory '{out}' is a file.")
    assert out.read_text() == "x"

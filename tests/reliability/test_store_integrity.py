"""Never silently wrong (issue 17, item 4): every metadata field that changes what a reader decodes is
covered by the units' markers (an edited teacher.scale fails verify and train refuses it); a marker
that does not cover every array of its unit with a digest is not done; each unit is bound to its exact
input shard (two `train-000000.tar` in different folders are never confused); a shard changed after
precompute is refused naming it (size always, sha256 with `--check-data full`); `verify --recompute`
with another teacher says so in one line."""
import json
import shutil
import tarfile

import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, store_files, write_tar

STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
           "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3"]


def precompute_args(data, out, *extra):
    data = [data] if isinstance(data, str) else data
    return ["precompute", *[a for d in data for a in ("--data", d)], *TEACHER_ARGS, *FAST, "--ray", "none",
            "--out", out, *extra]


def train(data, store, run, *extra):
    data = [data] if isinstance(data, str) else data
    return invoke("train", *[a for d in data for a in ("--data", d)], "--cache", store, "--out", run, *STUDENT,
                  "--max-steps", "2", "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet", *extra)


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = noise_shards(root / "d", 32, shard_size=8, seed=11)
    result = invoke(*precompute_args(data, root / "clean.zarr"))
    assert result.exit_code == 0, result.output
    return data, root / "clean.zarr"


def copy(clean, tmp_path):
    data, source = clean
    shutil.copytree(source, tmp_path / "s.zarr")
    return data, tmp_path / "s.zarr"


def _edit(store, rel, change):
    doc = json.loads((store / rel).read_text())
    change(doc)
    (store / rel).write_text(json.dumps(doc))


def _meta(change):
    return lambda store: _edit(store, "zarr.json", lambda doc: change(doc["attributes"]["attncache"]))


def _swap_urls(meta):
    shards = meta["dataset"]["shards"]
    shards[0]["url"], shards[1]["url"] = shards[1]["url"], shards[0]["url"]


EDITS = {  # fields the cache_id does not cover, each changing what a reader decodes
    "teacher.scale x20": _meta(lambda m: m["teacher"].update(scale=m["teacher"]["scale"] * 20)),
    "token layout": _meta(lambda m: m["tokens"].update(num_prefix_tokens=0)),
    "shard each unit came from": _meta(_swap_urls),
    "array dtype in the metadata": _meta(lambda m: m["arrays"]["a"].update(dtype="uint8")),
    "array zarr.json data_type": lambda s: _edit(s, "views/0/factors/a/zarr.json",
                                                 lambda doc: doc.update(data_type="uint8")),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_metadata_fails_verify_and_train_refuses_it(edit, clean, tmp_path):
    data, store = copy(clean, tmp_path)
    EDITS[edit](store)
    verified = invoke("verify", store)
    assert verified.exit_code == 1 and "0/4 units ok" in verified.output, verified.output
    assert verified.output.count("metadata (zarr.json) was edited after this unit was written") == 4
    trained = train(data, store, tmp_path / "run")
    assert trained.exit_code == 1 and "edited after this unit was written" in error_line(trained.output)
    assert not (tmp_path / "run").exists()


def _null_digests(store):
    marker = json.loads((store / "units/0/000001.json").read_text())
    for rel in marker["files"]:
        marker["files"][rel] = None
        (store / rel).unlink()
    (store / "units/0/000001.json").write_text(json.dumps(marker))


def _drop_factor_entries(store):
    marker = json.loads((store / "units/0/000001.json").read_text())
    for rel in [r for r in marker["files"] if "/factors/" in r]:
        del marker["files"][rel]
        marker["sizes"].pop(rel, None)
        (store / rel).unlink()
    (store / "units/0/000001.json").write_text(json.dumps(marker))


MARKER_EDITS = {"digests nulled, files deleted": _null_digests, "factor files left out": _drop_factor_entries}


@pytest.mark.parametrize("edit", list(MARKER_EDITS))
def test_a_marker_that_does_not_cover_every_array_is_not_done(edit, clean, tmp_path):
    data, store = copy(clean, tmp_path)
    MARKER_EDITS[edit](store)
    verified = invoke("verify", store)
    assert verified.exit_code == 1 and "3/4 units ok" in verified.output and "view 0 shard 000001" in verified.output
    trained = train(data, store, tmp_path / "run")
    assert trained.exit_code == 1 and "view 0 shard 000001" in error_line(trained.output)
    assert not (tmp_path / "run").exists()
    rerun = invoke(*precompute_args(data, store))  # a plain re-run redoes the unit
    assert rerun.exit_code == 0 and "units: 1 processed, 3 already done" in rerun.output, rerun.output
    assert differing(store_files(clean[1]), store_files(store)) == []


def test_a_unit_of_only_bad_samples_has_a_digest_for_every_array(clean, tmp_path):
    good = noise_shards(tmp_path / "d", 4, shard_size=4, seed=2)
    bad = write_tar(tmp_path / "d" / "train-000001.tar", [("x.png", b"not a png"), ("x.cls", b"1")])
    out = tmp_path / "s.zarr"
    result = invoke(*precompute_args([good, bad], out))
    assert result.exit_code == 0 and "skipped: 1" in result.output, result.output
    marker = json.loads((out / "units/0/000001.json").read_text())
    assert marker["written"] == 0 and all(isinstance(d, str) for d in marker["files"].values()), marker["files"]
    assert invoke("verify", out).exit_code == 0
    (out / "views/0/valid/c/1").unlink()  # the empty unit's files are real files, checked like any other
    assert invoke("verify", out).exit_code == 1


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two shards named train-000000.tar in folders a/ and b/, same keys, other images."""
    root = tmp_path_factory.mktemp("twins")
    noise_shards(root / "a", 8, shard_size=8, seed=1)
    noise_shards(root / "b", 8, shard_size=8, seed=2)
    a, b = str(root / "a" / "train-000000.tar"), str(root / "b" / "train-000000.tar")
    result = invoke(*precompute_args([a, b], root / "twins.zarr"))
    assert result.exit_code == 0, result.output
    return root, a, b


def test_shards_of_the_same_name_are_bound_to_their_own_folder(twins, tmp_path):
    from attncache.pipeline.data.shards import DataError
    from attncache.pipeline.train.loader import match_shards
    from attncache.pipeline.store.cache import CacheStore

    root, a, b = twins
    store = CacheStore.open(root / "twins.zarr")
    assert match_shards(store, (a, b)) == (a, b)
    assert match_shards(store, (b, a)) == (a, b)
    moved = tmp_path / "moved"
    for name in ("a", "b"):
        shutil.copytree(root / name, moved / name)
    assert match_shards(store, (str(moved / "b" / "train-000000.tar"), str(moved / "a" / "train-000000.tar"))) == \
        (str(moved / "a" / "train-000000.tar"), str(moved / "b" / "train-000000.tar"))
    for name in ("c", "d"):
        shutil.copytree(root / "a", tmp_path / name)
    with pytest.raises(DataError, match="cannot tell which shard is the cache's shard 0"):
        match_shards(store, (str(tmp_path / "c" / "train-000000.tar"), str(tmp_path / "d" / "train-000000.tar")))


def test_a_resume_given_same_name_shards_in_another_order_rebuilds_each_from_its_own(twins, tmp_path):
    root, a, b = twins
    store = tmp_path / "s.zarr"
    shutil.copytree(root / "twins.zarr", store)
    (store / "units/0/000001.json").unlink()  # b's unit, to be redone
    result = invoke(*precompute_args([b, a], store))
    assert result.exit_code == 0 and "units: 1 processed, 1 already done" in result.output, result.output
    assert differing(store_files(root / "twins.zarr"), store_files(store)) == []


def _rewrite_shard(path, change):
    """Rewritten the way noise_shards wrote it (pipeline.data.shards.shard_writer), members changed."""
    from attncache.pipeline.data.shards import shard_writer

    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, dict] = {}
    for name, data in change(members):
        key, ext = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    with shard_writer(path) as sink:
        for sample in samples.values():
            sink.write(sample)


def _other_images(members):
    """Same keys, other images of other sizes: what a re-packed shard looks like."""
    from PIL import Image

    from relhelp import png

    return [(n, png(Image.new("RGB", (32, 32), (i, 0, 0))) if n.endswith(".png") else d)
            for i, (n, d) in enumerate(members)]


def _other_labels(members):
    """Same keys, same member names and sizes, other labels: only the shard's sha256 tells."""
    return [(n, str((int(d) + 1) % 4).encode() if n.endswith(".cls") else d) for n, d in members]


def _data_copy(clean, tmp_path):
    data, store = clean
    shutil.copytree(store.parent / "d", tmp_path / "d")
    return data.replace(str(store.parent / "d"), str(tmp_path / "d")), tmp_path / "d" / "train-000001.tar"


def test_a_shard_changed_after_precompute_is_refused_naming_it(clean, tmp_path):
    data, shard = _data_copy(clean, tmp_path)
    _rewrite_shard(shard, _other_images)
    trained = train(data, clean[1], tmp_path / "run")
    line = error_line(trained.output)
    assert trained.exit_code == 1 and "train-000001.tar" in line and "changed since precompute" in line, line
    assert not (tmp_path / "run").exists()


def test_a_same_size_change_is_refused_by_the_full_check(clean, tmp_path):
    data, shard = _data_copy(clean, tmp_path)
    size = shard.stat().st_size
    _rewrite_shard(shard, _other_labels)
    assert shard.stat().st_size == size
    trained = train(data, clean[1], tmp_path / "run", "--check-data", "full")
    line = error_line(trained.output)
    assert trained.exit_code == 1 and "train-000001.tar" in line and "sha256 differs" in line, line
    assert not (tmp_path / "run").exists()
    store = tmp_path / "s.zarr"
    shutil.copytree(clean[1], store)
    before = store_files(store)
    repaired = invoke(*precompute_args(data, store, "--repair"))  # repair never mixes in other data
    assert repaired.exit_code == 1 and "train-000001.tar" in error_line(repaired.output)
    assert differing(before, store_files(store)) == []


def test_recompute_with_another_teacher_is_one_line(clean):
    _, store = clean
    result = invoke("verify", store, "--recompute", "2", *TEACHER_ARGS, "--seed", "1")
    assert result.exit_code == 1
    assert "teacher identity differs" in error_line(result.output) and "weights_sha256" in result.output
    same = invoke("verify", store, "--recompute", "2", *TEACHER_ARGS)
    assert same.exit_code == 0, same.output


def _as_version_1(store):
    """What a store made before this round holds: schema_version 1 in the metadata and markers."""
    _edit(store, "zarr.json", lambda doc: doc["attributes"]["attncache"].update(schema_version=1))
    for marker in store.glob("units/*/*.json"):
        _edit(store, marker.relative_to(store), lambda doc: doc.update(schema_version=1))


def test_a_version_1_store_is_refused_in_one_line_by_every_command_and_left_untouched(clean, tmp_path):
    data, store = copy(clean, tmp_path)
    _as_version_1(store)
    before = store_files(store)
    advice = "written by an older attncache whose markers do not cover the metadata and input shards"
    for result in (invoke("verify", store), invoke("inspect", store), invoke(*precompute_args(data, store)),
                   train(data, store, tmp_path / "run")):
        assert result.exit_code == 1, result.output
        line = error_line(result.output) if "Error" in result.output else result.output
        assert "schema_version 1" in line and advice in line, result.output
    assert differing(before, store_files(store)) == [] and not (tmp_path / "run").exists()

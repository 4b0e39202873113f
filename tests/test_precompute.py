"""precompute end to end on real tar shards and real Zarr stores: determinism, resume, replay, bad input."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.shards import BadSample, decode_sample, iter_shard
from attncache.pipeline.precompute.job import OnBadSample, PrecomputeConfig, TooManySkipped
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.checks import inspect_store, verify_store
from attncache.pipeline.store.layout import parse_compression
from attncache.pipeline.store.meta import StoreError
from attncache.pipeline.teacher.model import Teacher, TeacherConfig

from tests.assets.machine_pins import KEY as MACHINE, check
from attncache.pipeline.tools.recompute import recompute_check
from attncache.storage_schema import SchemaError

TEACHER = TeacherConfig("vit_tiny_patch16_224", (("depth", 3), ("embed_dim", 48), ("img_size", 32),
                                                  ("num_heads", 3), ("patch_size", 8)), random_init=True, seed=0)
TEACHER_ARGS = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--model-arg", "depth=3",
                "--model-arg", "embed_dim=48", "--model-arg", "img_size=32", "--model-arg", "num_heads=3",
                "--model-arg", "patch_size=8"]


def _config(data, out, **kw):
    base = dict(data=(data,), out=str(out), teacher=TEACHER, views=2, encoding="lowrank:r=8:int8", batch_size=16,
                workers=0, threads=1, progress=False)
    base.update(kw)
    return PrecomputeConfig(**base)


def _all_files(store_dir) -> dict[str, bytes]:
    """Every file of a store; markers without their timing field, the only thing allowed to differ."""
    root = Path(store_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.parts[-3] == "units":
                marker = json.loads(data)
                marker.pop("seconds")
                data = json.dumps(marker, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def test_two_runs_write_byte_identical_arrays_and_worker_count_does_not_matter(synth_data, tmp_path):
    a = run_precompute(_config(synth_data["val"], tmp_path / "a.zarr"))
    run_precompute(_config(synth_data["val"], tmp_path / "b.zarr", workers=2))
    assert a.samples_written == 2 * 128 and a.units_processed == 2
    files_a, files_b = _all_files(tmp_path / "a.zarr"), _all_files(tmp_path / "b.zarr")
    assert files_a.keys() == files_b.keys()
    assert [k for k in files_a if files_a[k] != files_b[k]] == []
    assert any("/factors/a/c/" in k for k in files_a)


def test_store_metadata_describes_itself(synth_data, tmp_path):
    run_precompute(_config(synth_data["val"], tmp_path / "s.zarr", layers="0:2", heads="0,2"))
    store = CacheStore.open(tmp_path / "s.zarr")
    meta = store.meta
    assert meta["layers"] == [0, 1] and meta["heads"] == [0, 2]
    assert meta["tokens"] == {"count": 17, "num_prefix_tokens": 1, "grid": [4, 4]}
    assert meta["encoding"]["spec"] == "lowrank:r=8:int8" and meta["seed"] == 0
    assert meta["dataset"]["shards"][0]["count"] == 128
    assert meta["compute"]["threads"] == 1 and meta["compute"]["batch_size"] == 16
    assert store.group["views/1/factors/a"].shape == (128, 2, 2, 17, 8)
    info = inspect_store(tmp_path / "s.zarr")
    assert info["units_done"] == info["units_total"] == 2
    assert 0 < info["bytes_per_sample"] < info["raw_fp32_map_bytes_per_sample"]


def test_replayed_images_equal_what_the_teacher_saw_bit_for_bit(synth_data, tmp_path, monkeypatch):
    seen = {}
    original = Teacher.capture

    def spy(self, images, layers, heads=None):
        seen.setdefault("batches", []).append(images.clone())
        return original(self, images, layers, heads)

    monkeypatch.setattr(Teacher, "capture", spy)
    run_precompute(_config(synth_data["val"], tmp_path / "r.zarr", views=1))
    teacher_saw = torch.cat(seen["batches"])
    store = CacheStore.open(tmp_path / "r.zarr")
    recipe = Recipe.from_json(store.meta["recipe"]["ops"])
    assert recipe.is_random
    data = store.read_unit(0, 0)
    url = store.meta["dataset"]["shards"][0]["url"]
    rebuilt = []
    for entry in iter_shard(url):
        image, _ = decode_sample(url, entry)
        assert str(data.keys[entry.position]) == entry.key
        rebuilt.append(recipe.apply(data.aug[entry.position, :recipe.num_params], image))
    assert torch.equal(torch.stack(rebuilt), teacher_saw)


def test_verify_names_a_corrupted_unit_and_a_missing_marker(synth_data, tmp_path):
    out = tmp_path / "v.zarr"
    run_precompute(_config(synth_data["val"], out))
    assert verify_store(out).ok
    victim = out / "views/1/factors/b/c/0/0/0/0/0"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    (out / "units/0/000000.json").unlink()
    report = verify_store(out)
    assert not report.ok and report.units_ok == 0
    assert any("view 1 shard 000000" in p and "checksum mismatch in views/1/factors/b" in p for p in report.problems)
    assert any("view 0 shard 000000" in p and "missing" in p for p in report.problems)
    # a re-run redoes exactly the unit without a marker; the corrupted one stays reported by verify
    summary = run_precompute(_config(synth_data["val"], out))
    assert summary.units_processed == 1


def test_verify_cli_exits_non_zero_and_recompute_agrees_with_the_teacher(synth_data, tmp_path):
    from click.testing import CliRunner
    from attncache.cli.main import cli

    out = tmp_path / "c.zarr"
    run_precompute(_config(synth_data["val"], out, encoding="exact:fp32"))
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(out), "--recompute", "5", "--json", *TEACHER_ARGS])
    result = json.loads(ok.output)
    assert ok.exit_code == 0 and result["recompute"]["samples"] == 5
    assert result["recompute"]["max_kl"] < 1e-6
    (out / "units/1/000000.json").unlink()
    bad = runner.invoke(cli, ["verify", str(out)])
    assert bad.exit_code == 1 and "view 1 shard 000000" in bad.output


def test_recompute_catches_a_cache_that_disagrees_with_the_teacher(synth_data, tmp_path):
    out = tmp_path / "w.zarr"
    run_precompute(_config(synth_data["val"], out, views=1))
    store = CacheStore.open(out, mode="r+")
    arr = store.group["views/0/factors/a"]
    arr[0:128] = np.roll(arr[0:128], 1, axis=0)  # factors shifted to the wrong samples
    report = recompute_check(store, TEACHER, k=6)
    assert not report["ok"] and report["mismatched"]


def test_resume_with_other_settings_is_refused_naming_the_field(synth_data, tmp_path):
    run_precompute(_config(synth_data["val"], tmp_path / "x.zarr"))
    with pytest.raises(StoreError, match="encoding"):
        run_precompute(_config(synth_data["val"], tmp_path / "x.zarr", encoding="exact:fp16"))
    with pytest.raises(StoreError, match="seed"):
        run_precompute(_config(synth_data["val"], tmp_path / "x.zarr", seed=1))


def test_a_store_of_the_old_default_encoding_rerun_with_the_new_default_says_how_to_resume(synth_data, tmp_path):
    """lowrank:r=8:int8 was the default until 2026-12-02: re-running such a store's command without
    --encoding is refused, names the flag that resumes it, and leaves every byte as it was."""
    out = tmp_path / "old.zarr"
    run_precompute(_config(synth_data["val"], out, views=1))
    before = _all_files(out)
    rerun = dict(_config(synth_data["val"], out, views=1).__dict__)
    del rerun["encoding"]  # the user's command gave none: the default now is another encoding
    with pytest.raises(StoreError, match=r"encoding: store has .*To resume this store, give --encoding "
                                         r"lowrank:r=8:int8 --compression zstd:3\. Use another --out"):
        run_precompute(PrecomputeConfig(**rerun))
    assert _all_files(out) == before
    with pytest.raises(StoreError) as other:  # more than the encoding differs: no --encoding hint
        run_precompute(_config(synth_data["val"], out, views=1, encoding="exact:fp16", seed=1))
    assert "To resume" not in str(other.value)
    resumed = run_precompute(_config(synth_data["val"], out, views=1))  # the hint's command: resumes, writes nothing
    assert resumed.units_processed == 0 and resumed.units_already_done > 0 and _all_files(out) == before


def test_a_store_fitted_by_the_eigh_rerun_under_todays_fitter_is_refused_naming_fit_eigh(synth_data, tmp_path):
    """Every low-rank store before 2026-12-03 was fitted by the full eigh, and its metadata names no
    fitter: re-running its command (same spec) is refused, bytes unchanged, naming the spec that
    resumes it; that command resumes it and writes nothing, and the store reads as an eigh store."""
    out = tmp_path / "eigh.zarr"
    run_precompute(_config(synth_data["val"], out, views=1, encoding="lowrank:r=8:int8:fit=eigh"))
    meta = CacheStore.open(out).meta
    assert "fitter" not in meta["encoding"] and meta["encoding"]["spec"] == "lowrank:r=8:int8"  # as before
    before = _all_files(out)
    with pytest.raises(StoreError, match=r"encoding: store has .*To resume this store, give --encoding "
                                         r"lowrank:r=8:int8:fit=eigh\. Use another --out"):
        run_precompute(_config(synth_data["val"], out, views=1, encoding="lowrank:r=8:int8"))
    assert _all_files(out) == before
    resumed = run_precompute(_config(synth_data["val"], out, views=1, encoding="lowrank:r=8:int8:fit=eigh"))
    assert resumed.units_processed == 0 and resumed.units_already_done > 0 and _all_files(out) == before
    assert CacheStore.open(out).encoding.spec == "lowrank:r=8:int8:fit=eigh"


def test_each_encoding_gets_its_own_compressor_unless_one_is_given(synth_data, tmp_path):
    """Without --compression a store records its encoding's compressor (pipeline/encodings/default.py):
    zstd:3:shuffle for int4 low-rank rows, zstd:3 for int8 and low-rank fp16 rows, zstd:1:shuffle:block=1M
    for exact 16- and 32-bit float rows; a given one wins."""
    cases = [("lowrank:r=2:int4", None, "zstd:3:shuffle"), ("lowrank:r=8:int8", None, "zstd:3"),
             ("exact:fp16", None, "zstd:1:shuffle:block=1M"), ("lowrank:r=2:int4", "zstd:3", "zstd:3"),
             ("lowrank:r=2:fp16", None, "zstd:3"), ("exact:fp16", "zstd:3", "zstd:3")]
    for i, (encoding, given, recorded) in enumerate(cases):
        out = tmp_path / f"c{i}.zarr"
        run_precompute(_config(synth_data["val"], out, views=1, encoding=encoding, compression=given))
        store = CacheStore.open(out)
        assert store.meta["compression"] == parse_compression(recorded), (encoding, given)
        assert verify_store(out).ok
    shuffled, plain = CacheStore.open(tmp_path / "c0.zarr"), CacheStore.open(tmp_path / "c3.zarr")
    assert shuffled.meta["cache_id"] != plain.meta["cache_id"]  # the compressor is part of the id
    one, other = shuffled.read_unit(0, 0), plain.read_unit(0, 0)
    for name in one.factors:  # what a reader decodes does not depend on the compressor
        np.testing.assert_array_equal(one.factors[name], other.factors[name])
    # the recorded compressor is the one the shards went through (which saves more on ViT-S, BENCHMARKS.md)
    assert shuffled.unit_factor_bytes(shuffled.units()[0]) != plain.unit_factor_bytes(plain.units()[0])
    codecs = json.loads((tmp_path / "c0.zarr" / "views/0/factors/a/zarr.json").read_text())["codecs"]
    assert '"shuffle": "shuffle"' in json.dumps(codecs) and '"cname": "zstd"' in json.dumps(codecs)
    blocked, zstd3 = CacheStore.open(tmp_path / "c2.zarr"), CacheStore.open(tmp_path / "c5.zarr")
    for name, values in blocked.read_unit(0, 0).factors.items():  # the same values through 1 MB blosc blocks
        np.testing.assert_array_equal(values, zstd3.read_unit(0, 0).factors[name])
    codecs = json.loads((tmp_path / "c2.zarr" / "views/0/factors/q/zarr.json").read_text())["codecs"]
    assert '"blocksize": 1048576' in json.dumps(codecs) and '"typesize": 2' in json.dumps(codecs)


def test_a_store_of_the_old_default_compressor_rerun_without_compression_says_how_to_resume(synth_data, tmp_path):
    """Default int4 stores were zstd:3 until 2026-12-03: re-running such a store's command is refused
    with every byte as it was, naming --compression zstd:3; that command resumes it and writes nothing.
    The default store of 2026-12-02 (eigh-fitted, zstd:3) is told both flags."""
    out = tmp_path / "old.zarr"
    old = dict(views=1, encoding="lowrank:r=2:int4", compression="zstd:3")
    run_precompute(_config(synth_data["val"], out, **old))
    before = _all_files(out)
    with pytest.raises(StoreError, match=r"compression: store has .*To resume this store, give --compression "
                                         r"zstd:3\. Use another --out"):
        run_precompute(_config(synth_data["val"], out, **dict(old, compression=None)))
    assert _all_files(out) == before
    resumed = run_precompute(_config(synth_data["val"], out, **old))
    assert resumed.units_processed == 0 and resumed.units_already_done > 0 and _all_files(out) == before

    eigh = tmp_path / "eigh.zarr"
    run_precompute(_config(synth_data["val"], eigh, **dict(old, encoding="lowrank:r=2:int4:fit=eigh")))
    before = _all_files(eigh)
    with pytest.raises(StoreError, match=r"To resume this store, give --encoding lowrank:r=2:int4:fit=eigh "
                                         r"--compression zstd:3\. Use another --out"):
        run_precompute(_config(synth_data["val"], eigh, **dict(old, compression=None)))
    assert _all_files(eigh) == before


def test_a_default_store_of_the_subspace_fitter_rerun_says_fit_subspace_and_resumes_so(synth_data, tmp_path):
    """The default store of 2026-12-03 (subspace fitter, zstd:3:shuffle): its command, re-run today, is
    refused with every byte as it was and names `--encoding lowrank:r=2:int4:fit=subspace`; that
    command resumes it writing nothing, and grows it by a view with the same fitter."""
    out = tmp_path / "day.zarr"
    run_precompute(_config(synth_data["val"], out, views=1, encoding="lowrank:r=2:int4:fit=subspace"))
    before = _all_files(out)
    rerun = {k: v for k, v in _config(synth_data["val"], out, views=1).__dict__.items() if k != "encoding"}
    with pytest.raises(StoreError, match=r"encoding: store has .*To resume this store, give --encoding "
                                         r"lowrank:r=2:int4:fit=subspace\. Use another --out"):
        run_precompute(PrecomputeConfig(**rerun))  # today's default encoding
    assert _all_files(out) == before
    resumed = run_precompute(_config(synth_data["val"], out, views=1, encoding="lowrank:r=2:int4:fit=subspace"))
    assert resumed.units_processed == 0 and resumed.units_already_done > 0 and _all_files(out) == before
    grown = run_precompute(_config(synth_data["val"], out, views=2, encoding="lowrank:r=2:int4:fit=subspace"))
    assert grown.units_processed > 0
    store = CacheStore.open(out)
    assert store.meta["encoding"]["fitter"] == "subspace" and store.encoding.spec == "lowrank:r=2:int4:fit=subspace"


@pytest.mark.parametrize("encoding,old_default", [("exact:fp16", "zstd:3"), ("exact:bf16", "zstd:1")])
def test_an_exact_store_of_its_old_default_compressor_is_refused_unchanged_and_resumes_as_hinted(
        synth_data, tmp_path, encoding, old_default):
    """exact:fp16 stores were zstd:3 and exact:bf16 ones zstd:1 until 1 MB blosc blocks became the
    16-bit rows' default (2026-12-03): a rerun without --compression is refused with every byte as it
    was, naming the old compressor; that command resumes, writing nothing; a new store gets blocks and
    holds the same values."""
    out = tmp_path / "old.zarr"
    old = dict(views=1, encoding=encoding, compression=old_default, threads=2)
    run_precompute(_config(synth_data["val"], out, **old))
    before = _all_files(out)
    with pytest.raises(StoreError, match=rf"To resume this store, give --compression {old_default}\. Use another --out"):
        run_precompute(_config(synth_data["val"], out, **dict(old, compression=None)))
    assert _all_files(out) == before
    resumed = run_precompute(_config(synth_data["val"], out, **old))
    assert resumed.units_processed == 0 and resumed.units_already_done > 0 and _all_files(out) == before
    new = tmp_path / "new.zarr"
    run_precompute(_config(synth_data["val"], new, **dict(old, compression=None)))
    assert CacheStore.open(new).meta["compression"] == parse_compression("zstd:1:shuffle:block=1M")
    assert CacheStore.open(new).meta["cache_id"] != CacheStore.open(out).meta["cache_id"]
    for name, values in CacheStore.open(new).read_unit(0, 0).factors.items():
        np.testing.assert_array_equal(values, CacheStore.open(out).read_unit(0, 0).factors[name])
    assert verify_store(new).ok


def test_a_resume_hint_names_the_compressor_whenever_it_differs(synth_data, tmp_path):
    """An int8 store (zstd:3) re-run under the int4 default, or with another --compression given: the
    hint names both flags (--encoding alone would bring zstd:3 back only if no --compression was
    given, which the hint cannot tell), and that command resumes the store writing nothing."""
    out = tmp_path / "int8.zarr"
    run_precompute(_config(synth_data["val"], out, views=1))
    before = _all_files(out)
    rerun = dict(_config(synth_data["val"], out, views=1).__dict__)
    del rerun["encoding"]
    hint = r"To resume this store, give --encoding lowrank:r=8:int8 --compression zstd:3\. "
    with pytest.raises(StoreError, match=r"shuffle.*" + hint):
        run_precompute(PrecomputeConfig(**rerun))
    with pytest.raises(StoreError, match=hint):
        run_precompute(PrecomputeConfig(**dict(rerun, compression="zstd:9")))
    assert _all_files(out) == before
    resumed = run_precompute(_config(synth_data["val"], out, views=1, encoding="lowrank:r=8:int8",
                                     compression="zstd:3"))
    assert resumed.units_processed == 0 and _all_files(out) == before


def test_unknown_schema_version_and_invalid_metadata_raise_clear_errors(synth_data, tmp_path):
    out = tmp_path / "m.zarr"
    run_precompute(_config(synth_data["val"], out, views=1))
    meta_file = out / "zarr.json"
    original = json.loads(meta_file.read_text())
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["attncache"]["schema_version"] = 99
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="schema_version 99.*newer"):
        CacheStore.open(out)
    doc = json.loads(json.dumps(original))
    del doc["attributes"]["attncache"]["tokens"]
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="tokens"):
        CacheStore.open(out)
    doc = json.loads(json.dumps(original))
    del doc["attributes"]["attncache"]
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="missing"):
        CacheStore.open(out)
    doc = json.loads(json.dumps(original))
    doc["attributes"]["attncache"]["teacher"]["name"] = "vit_large_patch16_224"
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="edited"):
        CacheStore.open(out)
    assert not verify_store(out).ok


@pytest.fixture
def messy_shards(tmp_path):
    """Two shards with every kind of trouble the core issue names, plus good samples around them."""
    rgb = Image.new("RGB", (40, 30), (200, 30, 30))
    gray = Image.new("L", (32, 32), 128)
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    tiny = Image.new("RGB", (3, 2), (0, 0, 255))
    members = [
        ("good0.png", _png(rgb)), ("good0.cls", b"1"),
        ("gray.png", _png(gray)), ("gray.cls", b"2"),
        ("cmyk.jpg", _jpeg(cmyk)), ("cmyk.cls", b"0"),
        ("tiny.png", _png(tiny)), ("tiny.cls", b"3"),
        ("garbage.jpg", b"this is not an image"), ("garbage.cls", b"1"),
        ("nolabel.png", _png(rgb)),
        ("good1.png", _png(rgb)), ("good1.cls", b"0"),
    ]
    _write_tar(tmp_path / "messy-000000.tar", members)
    whole = tmp_path / "whole.tar"
    _write_tar(whole, [("t0.png", _png(rgb)), ("t0.cls", b"1"), ("t1.png", _png(rgb)), ("t1.cls", b"1"),
                       ("t2.png", _png(rgb)), ("t2.cls", b"1")])
    with tarfile.open(whole) as tar:
        last = tar.getmember("t2.png")
    cut = last.offset_data + last.size // 2  # inside the last sample's image bytes
    (tmp_path / "messy-000001.tar").write_bytes(whole.read_bytes()[:cut])
    return str(tmp_path / "messy-{000000..000001}.tar")


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_inputs_are_converted_or_skipped_and_always_counted(messy_shards, tmp_path):
    summary = run_precompute(_config(messy_shards, tmp_path / "bad.zarr", views=1))
    reasons = {s["key"]: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"garbage", "nolabel", "t2"}, reasons
    assert "no label" in reasons["nolabel"] and "truncated" in reasons["t2"]
    store = CacheStore.open(tmp_path / "bad.zarr")
    written = []
    for shard in (0, 1):
        marker = store.read_marker(0, shard)
        assert marker["written"] + len(marker["skipped"]) == marker["count"]
        data = store.read_unit(0, shard)
        written += [str(k) for k, v in zip(data.keys, data.valid) if v]
    assert sorted(written) == sorted(["good0", "gray", "cmyk", "tiny", "good1", "t0", "t1"])
    assert summary.samples_written == 7 and len(summary.skipped) == 3
    assert verify_store(tmp_path / "bad.zarr").ok


def test_a_store_with_an_undecodable_sample_is_byte_identical_on_a_rerun(tmp_path):
    """A skipped sample's reason goes into its unit's marker: PIL's message names the address of a
    BytesIO, which differed between runs, so two runs of one job wrote different markers. Units after
    a full one (blocks of the same shape) keep no values in their empty and skipped slots."""
    rgb = [Image.new("RGB", (32, 32), (40 * i, 255 - 30 * i, 7 * i)) for i in range(8)]
    _write_tar(tmp_path / "r-000000.tar",
               [m for i in range(8) for m in ((f"s{i}.png", _png(rgb[i])), (f"s{i}.cls", b"1"))])
    _write_tar(tmp_path / "r-000001.tar", [("a.png", _png(rgb[3])), ("a.cls", b"2"), ("bad.png", b"not an image"),
                                           ("bad.cls", b"0"), ("b.png", _png(rgb[5])), ("b.cls", b"3")])
    data = str(tmp_path / "r-{000000..000001}.tar")
    for name in ("a", "b"):
        run_precompute(_config(data, tmp_path / f"{name}.zarr", views=1, batch_size=4, encoding="exact:fp16"))
    first, second = _all_files(tmp_path / "a.zarr"), _all_files(tmp_path / "b.zarr")
    assert [k for k in first if second.get(k) != first[k] and not k.endswith("zarr.json")] == []
    reason = CacheStore.open(tmp_path / "a.zarr").read_marker(0, 1)["skipped"][0]["reason"]
    assert reason.startswith("undecodable .png image (UnidentifiedImageError") and " at 0x" not in reason
    short = CacheStore.open(tmp_path / "a.zarr").read_unit(0, 1)
    assert list(short.valid) == [1, 0, 1, 0, 0, 0, 0, 0]
    for name, values in short.factors.items():
        assert not values[short.valid == 0].any() and values[short.valid == 1].any(), name


def test_fail_policy_and_skip_threshold_stop_the_job_naming_file_and_key(messy_shards, tmp_path):
    with pytest.raises(BadSample, match=r"messy-000000.tar: sample 'garbage'"):
        run_precompute(_config(messy_shards, tmp_path / "f.zarr", views=1, on_bad_sample=OnBadSample.FAIL))
    with pytest.raises(TooManySkipped, match="max-skipped 1"):
        run_precompute(_config(messy_shards, tmp_path / "g.zarr", views=1, max_skipped=1))


def _cli(*args):
    return [sys.executable, "-m", "attncache.cli.main", *args]


@pytest.mark.slow
def test_sigkill_part_way_then_resume_gives_the_same_bytes(tmp_path):
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=384, num_val=16, config=SynthConfig(image_size=32, num_classes=4), shard_size=32, seed=3)
    common = ["precompute", "--data", info["train"], *TEACHER_ARGS, "--views", "2", "--batch-size", "16",
              "--workers", "1", "--threads", "1", "--encoding", "lowrank:r=8:int8", "--ray", "none", "--quiet"]
    env = dict(os.environ)
    subprocess.run(_cli(*common, "--out", str(tmp_path / "ref.zarr")), check=True, env=env, capture_output=True)
    victim = tmp_path / "kill.zarr"
    proc = subprocess.Popen(_cli(*common, "--out", str(victim)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(victim.glob("units/*/*.json"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(victim.glob("units/*/*.json")))
    assert 5 <= done_before < 24, "the kill must land part-way through the job"
    resumed = subprocess.run(_cli(*common, "--out", str(victim)), check=True, env=env, capture_output=True, text=True)
    assert f"{done_before} already done" in resumed.stdout
    ref, got = _all_files(tmp_path / "ref.zarr"), _all_files(victim)
    assert ref.keys() == got.keys()
    assert [k for k in ref if ref[k] != got[k]] == []
    assert verify_store(victim).ok


def test_store_and_shards_by_url_through_fsspec(synth_data, tmp_path):
    """Object-store style paths: fsspec URLs for shards and store (memory:// stands in for s3://)."""
    data = "file://" + synth_data["val"]
    out = f"memory://bucket-{tmp_path.name}/c.zarr"
    first = run_precompute(_config(data, out, views=1))
    assert first.units_processed == 1 and first.samples_written == 128
    assert verify_store(out).ok
    assert run_precompute(_config(data, out, views=1)).units_already_done == 1
    assert inspect_store(out)["bytes_per_sample"] > 0


def test_rewriting_a_unit_removes_what_a_killed_writer_left(synth_data, tmp_path):
    out = tmp_path / "p.zarr"
    run_precompute(_config(synth_data["val"], out, views=1))
    shard_file = out / "views/0/factors/a/c/0/0/0/0/0"
    stale = shard_file.parent / f"{shard_file.name}.0123abcd.partial"
    stale.write_bytes(b"half a write")
    (out / "units/0/000000.json").unlink()
    assert run_precompute(_config(synth_data["val"], out, views=1)).units_processed == 1
    assert not stale.exists() and verify_store(out).ok


def _invoke(*args):
    from click.testing import CliRunner

    from attncache.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_glob_for_data_makes_the_store_the_brace_pattern_makes(tmp_path, monkeypatch):
    """`--data 'DIR/*.tar'` (what users type) and the brace pattern of the same shards: same cache id,
    same bytes in every file (markers less their timing), shards in sorted order; the glob is
    expanded once per run (pipeline/precompute/job.py `data_shards`), not again in `build_job`."""
    from attncache.pipeline.data import patterns
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    expanded = []
    real = patterns._matches
    monkeypatch.setattr(patterns, "_matches", lambda pattern, item: expanded.append(item) or real(pattern, item))

    info = synth_dataset(tmp_path / "d", num_train=48, num_val=8, config=SynthConfig(image_size=32, num_classes=4),
                         shard_size=16, seed=1)
    assert info["train"] == str(tmp_path / "d" / "train-{000000..000002}.tar")
    common = ["precompute", *TEACHER_ARGS, "--views", "1", "--batch-size", "16", "--workers", "0", "--threads", "1",
              "--encoding", "lowrank:r=8:int8", "--ray", "none", "--quiet"]
    brace = _invoke(*common, "--data", info["train"], "--out", tmp_path / "brace.zarr")
    expanded.clear()
    glob = _invoke(*common, "--data", tmp_path / "d" / "train-*.tar", "--out", tmp_path / "glob.zarr")
    assert brace.exit_code == 0 and glob.exit_code == 0, brace.output + glob.output
    assert expanded == [str(tmp_path / "d" / "train-*.tar")]
    a, b = _all_files(tmp_path / "brace.zarr"), _all_files(tmp_path / "glob.zarr")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert CacheStore.open(tmp_path / "glob.zarr").meta["cache_id"] == CacheStore.open(tmp_path / "brace.zarr").meta["cache_id"]
    shards = [s["url"] for s in CacheStore.open(tmp_path / "glob.zarr").meta["dataset"]["shards"]]
    assert shards == [str(tmp_path / "d" / f"train-{i:06d}.tar") for i in range(3)]


def test_a_glob_that_matches_nothing_is_one_line_naming_it_and_creates_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    pattern = tmp_path / "d" / "train-*.tar"
    for command in (["precompute", "--data", pattern, *TEACHER_ARGS, "--ray", "none", "--out", tmp_path / "s.zarr"],
                    ["precompute", "--data", pattern, *TEACHER_ARGS, "--ray", "local", "--out", tmp_path / "s.zarr"],
                    ["train", "--data", pattern, "--mode", "scratch", "--student", "vit_tiny_patch16_224",
                     "--out", tmp_path / "run", "--max-steps", "1"]):
        result = _invoke(*command)
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [f"Error: DataError: data glob '{pattern}' matches no files"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# A store made at main 0b09c8e (before issue 18: default layers were every layer, the forward ran to the end)
# with the job of `test_every_layer_store_is_byte_identical_to_the_old_default_and_the_default_is_0_to_minus_3`:
# its cache id and the sha256 over (path, bytes) of every file under views/. Recorded with torch 2.14.1+cu130.
OLD_DEFAULT_PIN = {"torch": "2.14.1+cu130", "layers": [0, 1, 2, 3],
                   "cache_id": "7ca158e0d9fcecd57c74ce957b51e48811a4b521df6cb3714f47858de5768070",
                   "views_sha256": "b8fe53f89fe63bd29bdc8c071d6cadb23d213a92be5a1af81299680e8cf2b526"}
# made when the subspace fitter became the default (2026-12-03), on the one machine kind that has run it
SUBSPACE_VIEWS_PIN = {"machine": "x86_64 AuthenticAMD AMD EPYC avx2",
                      "views_sha256": "1d4a849aa5a552adebe3043ac68d01b8ae5cb56b7ec44fb87628891b06b915bf"}
# made when the CholeskyQR fitter became the default (2026-12-03, evening), on the machine kind that made it
CHOLQR_VIEWS_PIN = {"machine": "x86_64 GenuineIntel Intel(R) Xeon(R) Processor @ 2.80GHz avx512",
                    "views_sha256": "14220762e6beb9099c6ba671cb7e05bebfcf9611c9fae868207e57e05ce12d0d"}
WIDE_HEAD_TEACHER = TeacherConfig("vit_tiny_patch16_224", (("depth", 2), ("embed_dim", 128), ("img_size", 32),
                                                           ("num_heads", 2), ("patch_size", 8)), random_init=True, seed=0)
DEEP_TEACHER = TeacherConfig("vit_tiny_patch16_224", (("depth", 4), ("embed_dim", 64), ("img_size", 32),
                                                      ("num_heads", 4), ("patch_size", 8)), random_init=True, seed=0)


def _views_sha256(store) -> str:
    import hashlib

    digest = hashlib.sha256()
    for p in sorted((Path(store) / "views").rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(store)).encode())
            digest.update(p.read_bytes())
    return digest.hexdigest()


def test_every_layer_store_is_byte_identical_to_the_old_default_and_the_default_is_0_to_minus_3(tmp_path):
    """Default layers: all but the last 3 (those a default student transfers), and their factors are
    the every-layer store's first slots exactly; `layers=":"` with `lowrank:r=8:int8:fit=eigh` (the
    default encoding until 2026-12-02, fitted as every store was until the subspace fitter) writes the
    old default store's bytes, and the same spec with today's fitter writes its own pinned bytes under
    another cache id."""
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=0, num_val=64, config=SynthConfig(image_size=32, num_classes=4),
                         shard_size=64, seed=0)
    job = dict(data=(info["val"],), teacher=DEEP_TEACHER, views=1, batch_size=32, workers=0, threads=1, progress=False,
               encoding="lowrank:r=8:int8:fit=eigh")
    run_precompute(PrecomputeConfig(out=str(tmp_path / "all.zarr"), layers=":", **job))
    run_precompute(PrecomputeConfig(out=str(tmp_path / "default.zarr"), **job))
    every, default = CacheStore.open(tmp_path / "all.zarr"), CacheStore.open(tmp_path / "default.zarr")
    assert every.meta["layers"] == [0, 1, 2, 3] and default.meta["layers"] == [0]
    names = [n for n in every.meta["arrays"] if n not in ("key", "label", "valid", "aug")]
    assert names and set(names) == {n for n in default.meta["arrays"] if n not in ("key", "label", "valid", "aug")}
    for name in names + ["key", "label", "valid", "aug"]:
        where = f"views/0/factors/{name}" if name in names else f"views/0/{name}"
        full, part = every.group[where][:], default.group[where][:]
        assert np.array_equal(part, full[:, :1] if name in names else full), name
    if torch.__version__ != OLD_DEFAULT_PIN["torch"]:
        pytest.skip(f"the byte pin was recorded with torch {OLD_DEFAULT_PIN['torch']} (cache id includes it)")
    check("precompute/old_default_cache_id", every.meta["cache_id"], OLD_DEFAULT_PIN["cache_id"])  # the teacher's digest is in it
    check("precompute/old_default_views_sha256", _views_sha256(tmp_path / "all.zarr"), OLD_DEFAULT_PIN["views_sha256"])
    # head dim 64 (ViT-S/B/L's), where r = 8 takes the iteration; at this teacher's d = 16 it is the eigh
    wide = dict(job, encoding="lowrank:r=8:int8", teacher=WIDE_HEAD_TEACHER)
    stores = {}
    for name, fit in (("new", ""), ("subspace", ":fit=subspace"), ("eigh", ":fit=eigh")):
        run_precompute(PrecomputeConfig(out=str(tmp_path / f"{name}.zarr"), layers=":",
                                        **dict(wide, encoding="lowrank:r=8:int8" + fit)))
        stores[name] = CacheStore.open(tmp_path / f"{name}.zarr")
    new, subspace, eigh = stores["new"], stores["subspace"], stores["eigh"]
    assert new.meta["encoding"]["fitter"] == "cholqr" and subspace.meta["encoding"]["fitter"] == "subspace"
    assert "fitter" not in eigh.meta["encoding"]
    assert len({s.meta["cache_id"] for s in stores.values()}) == 3
    for one, other in ((new, subspace), (new, eigh), (subspace, eigh)):
        assert not np.array_equal(one.group["views/0/factors/a"][:], other.group["views/0/factors/a"][:])
    for name, pin in (("subspace", SUBSPACE_VIEWS_PIN), ("new", CHOLQR_VIEWS_PIN)):
        if MACHINE == pin["machine"]:
            assert _views_sha256(tmp_path / f"{name}.zarr") == pin["views_sha256"], name
    if MACHINE not in (SUBSPACE_VIEWS_PIN["machine"], CHOLQR_VIEWS_PIN["machine"]):
        pytest.skip(f"the iteration stores' bytes were pinned on {SUBSPACE_VIEWS_PIN['machine']} (subspace) and "
                    f"{CHOLQR_VIEWS_PIN['machine']} (cholqr), this is {MACHINE}")


def test_a_d_64_teachers_default_store_is_the_same_bytes_at_every_thread_worker_and_batch_count(tmp_path):
    """At head dim 64 the default encoding takes the CholeskyQR iteration (at the fixture teacher's
    d = 16 every fitter is the eigh): its store's bytes must not depend on the thread count, the
    loader workers or the teacher batch (a unit's last batch is shorter), and must be its own bytes,
    not the subspace fitter's."""
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=0, num_val=40, config=SynthConfig(image_size=32, num_classes=4),
                         shard_size=40, seed=0)
    job = dict(data=(info["val"],), teacher=WIDE_HEAD_TEACHER, views=1, progress=False, layers=":")
    runs = {"one thread": dict(threads=1, workers=0, batch_size=16), "two threads, two workers":
            dict(threads=2, workers=2, batch_size=16), "batch 7": dict(threads=2, workers=0, batch_size=7)}
    digests = {}
    for name, compute in runs.items():
        out = tmp_path / f"{len(digests)}.zarr"
        run_precompute(PrecomputeConfig(out=str(out), **job, **compute))
        assert CacheStore.open(out).meta["encoding"]["fitter"] == "cholqr"
        digests[name] = _views_sha256(out)
    assert len(set(digests.values())) == 1, digests
    run_precompute(PrecomputeConfig(out=str(tmp_path / "subspace.zarr"), encoding="lowrank:r=2:int4:fit=subspace",
                                    **job, **runs["one thread"]))
    assert _views_sha256(tmp_path / "subspace.zarr") != digests["one thread"]


def test_a_store_resumed_at_another_thread_count_or_grown_under_the_new_default_says_which_flags(synth_data,
                                                                                                 tmp_path):
    """The thread count defaults to the machine's cores, the encoding to a release's choice: a re-run
    on another machine, or one that grows an old-default store by a view, names every flag that
    resumes it; the hinted command grows the store; a refused run changes no byte."""
    out = tmp_path / "t.zarr"
    run_precompute(_config(synth_data["val"], out, views=1, threads=1))
    before = _all_files(out)
    with pytest.raises(StoreError, match=r"To resume this store, give --threads 1\. Use another --out"):
        run_precompute(_config(synth_data["val"], out, views=1, threads=2))
    rerun = dict(_config(synth_data["val"], out, views=2, threads=2).__dict__)
    del rerun["encoding"]  # the default, now lowrank:r=2:int4
    with pytest.raises(StoreError, match=r"To resume this store, give --encoding lowrank:r=8:int8 --compression "
                                         r"zstd:3 --threads 1 \(and the --views you ask for: the store grows\)\."):
        run_precompute(PrecomputeConfig(**rerun))
    assert _all_files(out) == before
    grown = run_precompute(_config(synth_data["val"], out, views=2, threads=1, compression="zstd:3"))  # the hint's
    assert grown.units_processed > 0 and inspect_store(str(out))["views"] == 2


@pytest.mark.parametrize("recorded,hint", [
    ({"codec": "zstd", "level": 3, "shuffle": "bit"}, "--compression zstd:3:bitshuffle"),
    ({"codec": "none", "level": 0, "shuffle": "none"}, "--compression none"),
    ({"codec": "zstd", "level": 12, "shuffle": "byte"}, None),  # no flag makes it: blosc stops at 9
    ({"codec": "lz4", "level": 5, "shuffle": "byte"}, None),
    ({"codec": "zstd", "level": "3", "shuffle": "none"}, None),
    ({"codec": "zstd"}, None),
    ("zstd:3", None),
])
def test_a_resume_hint_names_a_recorded_compressor_only_where_a_flag_makes_it(recorded, hint):
    """Edited or foreign compression metadata: the refusal still names the field, and the hint gives
    --compression only where that flag would write exactly what the store records."""
    from attncache.pipeline.store.meta import require_same_job

    new = {"compression": {"codec": "zstd", "level": 3, "shuffle": "byte"}, "dataset": {"fingerprint": "f"}}
    old = dict(new, compression=recorded)
    with pytest.raises(StoreError, match="compression: store has") as refused:
        require_same_job("s.zarr", old, new)
    message = str(refused.value)
    if hint is None:
        assert "To resume" not in message
    else:
        assert f"To resume this store, give {hint}. Use another --out" in message

"""storage_schema's documents held true against real stores made by `precompute`.

Everything a reader in another language is told is re-done from the documents' words by
tests/spec_reader.py (numpy, and Pillow where REPLAY.md says only Pillow gives the same pixels; it
imports nothing of attncache): the replay of every op from a stored `aug` row, the cache id's bytes,
and the codecs decoded by hand (shard index, crc32c, zstd, vlen-utf8, byte order). Here it is
compared with real stores made by `precompute`, with the project's replay and cache id, and the
fields of the metadata, marker and lease and the fill values are checked against the tables. The
project's own functions appear only as what is compared against. The field tables are parsed from
storage_schema/FIELDS.md, so a field added to the store without a row there (or an `always` row
for a field that no store has) fails here.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from spec_reader import (MET, RANDAUG, canonical, crc32c, json_number, json_string, read_shard_file, spec_apply,
    spec_cache_id, spec_jitter, spec_keyed, spec_mix, spec_randaug_op, zarr_doc)

from attncache.pipeline.augment.mix import replay_unit
from attncache.pipeline.augment.ops import OPS
from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.store.lease import Lease, LeaseConfig
from attncache.pipeline.store.meta import cache_id
from attncache.pipeline.teacher.model import TeacherConfig

SCHEMA = Path(__file__).resolve().parents[1] / "storage_schema"
TEACHER = TeacherConfig("vit_tiny_patch16_224", (("depth", 1), ("embed_dim", 48), ("img_size", 32),
                                                  ("num_heads", 3), ("patch_size", 8)), random_init=True, seed=0)
IMAGENET = "mean=(0.485,0.456,0.406)"
STORES = {  # name: (recipe, encoding, compression, views)
    "rich": ("rrc(interpolation='random')|flip|jitter(hue=0.2)|randaug(n=3,m=9,mstd=0.5,inc=1,p=0.9," + IMAGENET
             + ")|normalize(" + IMAGENET + ",std=(0.229,0.224,0.225))|erase(p=0.8)|mix",
             "lowrank:r=4:int8", "zstd:3", 2),
    "plain": ("rrc(interpolation='nearest')|randaug(n=2,m=7,mstd=0,inc=0,p=1.0)|normalize|erase(p=1.0)|"
              "mix(mixup_alpha=0.8,cutmix_alpha=0.0)", "exact:fp16", "zstd:5:shuffle", 1),
    "eval": ("resize(interpolation='bilinear')|center_crop|normalize", "exact:fp32", "none", 1),
    "pad": ("center_crop(size=32)|flip(p=1.0)|normalize", "lowrank:r=2:int4", "zstd:3:bitshuffle", 1),
}
SIZES = [[(40, 30), (23, 37), (64, 48), (32, 32), (17, 50), None, (50, 50), (31, 29), (36, 36), (30, 41), (96, 64),
          (32, 20), (27, 27), (44, 35), (35, 44), (33, 31), (60, 30), (29, 52)],
         [(45, 33), (24, 24), (80, 20), (33, 64)]]
# None: a zero-byte image, skipped. 18 slots per shard: factor arrays have two inner chunks of 9 slots,
# and the second of shard 1 (4 samples) holds only fill values, so its index entry is "absent".


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shards of noisy gradients at odd sizes (so resampling differences would show), one bad
    sample, and a short second shard (slots past its count hold fill values)."""
    root, rng = tmp_path_factory.mktemp("specdata"), np.random.default_rng(7)
    for index, sizes in enumerate(SIZES):
        with tarfile.open(root / f"spec-{index:06d}.tar", "w") as tar:
            for i, size in enumerate(sizes):
                if size is None:
                    image = b""
                else:
                    w, h = size
                    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
                    noise = rng.integers(0, 90, (h, w, 3))
                    image = _png(np.clip(ramp * [1.0, 0.6, 0.3] + noise, 0, 255).astype(np.uint8))
                for name, payload in ((f"s{index}k{i}.png", image), (f"s{index}k{i}.cls", str(i % 4).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / "spec-{000000..000001}.tar")


@pytest.fixture(scope="module")
def stores(data, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("specstores"), {}
    for name, (recipe, encoding, compression, views) in STORES.items():
        out[name] = root / f"{name}.zarr"
        run_precompute(PrecomputeConfig(data=(data,), out=str(out[name]), teacher=TEACHER, views=views, seed=3,
                                        recipe=recipe, encoding=encoding, compression=compression, batch_size=8,
                                        workers=0, threads=1, progress=False))
    return out


def _meta(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["attncache"]


# ================================================================================ replay (REPLAY.md)

def _images(url: str) -> dict[int, Image.Image]:
    """Decoded RGB images of a shard by position (tar order; one entry per key, FIELDS.md `count`)."""
    out, keys = {}, []
    with tarfile.open(url) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if key not in keys:
                keys.append(key)
            if ext == "png":
                payload = tar.extractfile(member).read()
                if payload:
                    out[keys.index(key)] = Image.open(io.BytesIO(payload)).convert("RGB")
    return out


@pytest.mark.parametrize("name", list(STORES))
def test_replay_by_the_spec_equals_the_projects_replay_pixel_for_pixel(stores, name):
    import zarr

    store, meta = stores[name], _meta(stores[name])
    recipe, ops, layout = Recipe.from_json(meta["recipe"]["ops"]), meta["recipe"]["ops"], meta["recipe"]["layout"]
    group, checked, seen = zarr.open_group(str(store), mode="r"), 0, set()
    for view in range(meta["views"]):
        for shard_index, shard in enumerate(meta["dataset"]["shards"]):
            start = shard_index * meta["dataset"]["slots_per_shard"]
            aug = np.asarray(group[f"views/{view}/aug"][start:start + meta["dataset"]["slots_per_shard"]])
            valid = np.asarray(group[f"views/{view}/valid"][start:start + meta["dataset"]["slots_per_shard"]])
            images = {p: im for p, im in _images(shard["url"]).items() if valid[p]}
            assert sorted(images) == sorted(np.flatnonzero(valid))
            ours = {p: spec_apply(ops, layout, aug[p], im) for p, im in images.items()}
            if ops[-1]["op"] == "mix":
                mix = layout[-1]
                rows = {p: aug[p, mix["offset"]:mix["offset"] + 8] for p in images}
                ours = {p: spec_mix(rows[p], ours[p], ours[int(rows[p][1])]) for p in images}
                seen |= {("mix", int(r[0]), int(r[3])) for r in rows.values()}
            theirs = replay_unit(recipe, images, {p: aug[p] for p in images})
            for p in images:
                assert ours[p].dtype == np.float32 and ours[p].shape == (3, 32, 32)
                assert np.array_equal(ours[p], theirs[p].numpy()), f"view {view} shard {shard_index} position {p}"
                checked += 1
            for op, part in zip(ops, layout):
                for p in images:
                    block = aug[p, part["offset"]:part["offset"] + part["length"]]
                    if op["op"] in ("rrc", "flip", "erase"):
                        seen.add((op["op"], int(block[-1] if op["op"] == "rrc" else block[0] > 0)))
                    if op["op"] == "randaug":
                        seen |= {("randaug", int(i)) for i, a in block.reshape(-1, 4)[:, :2] if a}
    assert checked == meta["views"] * sum(len([s for s in sizes if s]) for sizes in SIZES)
    wanted = {"rich": {("rrc", 1), ("rrc", 2), ("flip", 0), ("flip", 1), ("erase", 0), ("erase", 1), ("mix", 1, 0),
                       ("mix", 1, 1)},
              "plain": {("rrc", 0), ("erase", 1), ("mix", 1, 0)}, "eval": set(), "pad": set()}[name]
    assert wanted <= seen, f"the store does not exercise {sorted(wanted - seen)}"


@pytest.mark.parametrize("increasing", [0, 1])
def test_every_randaug_op_and_magnitude_formula_by_the_spec(increasing):
    """Each of the 15 ops at low, middle and top magnitude, both signs, against the op's replay."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (29, 37, 3), dtype=np.uint8), "RGB")
    args = {"n": 1, "m": 9.0, "mstd": 0.5, "p": 0.5, "inc": increasing, "mmax": 10.0, "mean": (0.485, 0.456, 0.406),
            "interpolation": "bilinear"}
    fill = tuple(int(round(c * 255)) for c in args["mean"])
    assert fill == (124, 116, 104)
    for index, name in enumerate(RANDAUG[increasing]):
        for magnitude in (0.0, 3.7, 5.0, 9.0, 10.0):
            for sign in (-1.0, 1.0):
                params = np.array([index, 1.0, magnitude, sign])
                theirs = OPS["randaug"].apply(args, params, image)
                ours = spec_randaug_op(name, magnitude, sign, image, fill, Image.BILINEAR)
                assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, magnitude, sign)
                not_applied = OPS["randaug"].apply(args, np.array([index, 0.0, magnitude, sign]), image)
                assert np.array_equal(np.asarray(not_applied), np.asarray(image))


def test_colour_jitter_by_the_spec_in_every_order():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (21, 26, 3), dtype=np.uint8), "RGB")
    args = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.3}
    for trial in range(24):
        params = OPS["jitter"].draw(args, np.random.default_rng(trial), 26, 21)
        ours, theirs = spec_jitter(args, params, image), OPS["jitter"].apply(args, params, image)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), params
    skip = dict(args, contrast=0.0)
    params = np.array([1.2, 0.5, 1.1, -0.2, 1, 0, 2, 3])  # contrast 0.5 is stored but the op is off: not applied
    assert np.array_equal(np.asarray(OPS["jitter"].apply(skip, params, image)),
                          np.asarray(spec_jitter(skip, params, image)))


# ================================================================================ cache id (FORMAT.md)


def _blocks_after(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)


def test_cache_id_recomputed_from_the_spec_matches_every_store_and_the_worked_example(stores):
    for store in stores.values():
        meta = _meta(store)
        assert spec_cache_id(meta) == meta["cache_id"] == cache_id(meta)
    text = (SCHEMA / "FORMAT.md").read_text()
    example, canonical_text = _blocks_after(text, "### Worked example")[:2]
    stated = re.search(r"cache_id = `([0-9a-f]{64})`", text.split("### Worked example", 1)[1]).group(1)
    meta = json.loads(example)
    assert canonical(spec_keyed(meta)) == canonical_text.strip()
    assert hashlib.sha256(canonical_text.strip().encode("ascii")).hexdigest() == stated
    assert spec_cache_id(meta) == stated == cache_id(meta)
    assert canonical(spec_keyed(meta)) == json.dumps(spec_keyed(meta), sort_keys=True, separators=(",", ":"))
    for x in (0.0, -0.0, 1.0, 0.1, 1e-05, 0.0001, 123456789012345.6, 1e16, 1.5e+300, 5e-324, -2.5e-07, 1 / 3):
        assert json_number(x) == json.dumps(x), x
    for text in ("plain", 'quote " and back\\slash', "tab\t new\nline \x01 \x7f", "caf\u00e9", "\U0001f600"):
        assert json_string(text) == json.dumps(text), text


# ================================================================================ fields (FIELDS.md)


def field_table(title: str) -> dict[str, tuple[str, str]]:
    """{path: (type, present)} from the table under `title` in FIELDS.md."""
    section = (SCHEMA / "FIELDS.md").read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|", section, flags=re.M)
    assert rows, title
    return {path: (kind.strip(), present.strip()) for path, kind, present in rows}


TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None), "object": dict,
         "map": dict, "list": list}


def _placeholder(table: dict, prefix: str) -> str | None:
    """The table's row for "any key" under `prefix` (`arrays.<name>`, `files.<file>`), if it has one."""
    for path in table:
        parent, _, last = path.rpartition(".")
        if parent == prefix and last.startswith("<"):
            return path
    return None


def found_fields(doc: dict, table: dict, prefix: str = "") -> dict[str, object]:
    """Every field of `doc` as the table's paths: `.` between keys, `[]` for the items of a list of
    objects, `<...>` for the keys of a map whose keys are names (arrays, files)."""
    out = {}
    for key, value in doc.items():
        path = _placeholder(table, prefix) or (f"{prefix}.{key}" if prefix else key)
        out.setdefault(path, value)
        kind = table.get(path, ("?",))[0]
        if isinstance(value, dict) and kind == "object":
            out.update(found_fields(value, table, path))
        if isinstance(value, list) and kind == "list of objects":
            for item in value:
                out.update(found_fields(item, table, path + "[]"))
    return out


def _check_fields(docs: list[dict], table: dict) -> None:
    seen = {}
    for doc in docs:
        for path, value in found_fields(doc, table).items():
            assert path in table, f"field {path!r} of a real store is not in FIELDS.md"
            kinds = [k.strip() for k in table[path][0].split(" or ")]
            ok = any(isinstance(value, TYPES[k.split()[0]]) and not (k.split()[0] in ("integer", "number") and
                                                                    isinstance(value, bool)) for k in kinds)
            assert ok, f"{path}: {value!r} is not {table[path][0]}"
            seen[path] = value
    missing = [p for p, (_, present) in table.items() if present == "always" and p not in seen]
    assert not missing, f"FIELDS.md lists {missing} as always present, but no store has them"


def test_every_metadata_and_marker_field_is_in_the_spec_and_every_spec_field_in_a_store(stores):
    metas = [_meta(s) for s in stores.values()]
    _check_fields(metas, field_table("Store metadata"))
    markers = [json.loads(p.read_text()) for s in stores.values() for p in sorted((s / "units").rglob("*.json"))]
    assert any(m["skipped"] for m in markers)
    _check_fields(markers, field_table("Marker"))


def test_marker_lists_every_array_of_its_unit_and_one_d_file_names(stores):
    for store in stores.values():
        meta = _meta(store)
        for path in sorted((store / "units").rglob("*.json")):
            marker = json.loads(path.read_text())
            view, shard = marker["view"], marker["shard_index"]
            assert path.relative_to(store).as_posix() == f"units/{view}/{shard:06d}.json"
            expected = {"/".join([f"views/{view}/{spec['path']}", "c", str(shard)]
                                 + ["0"] * len(spec["trailing_shape"])) for spec in meta["arrays"].values()}
            assert set(marker["files"]) == set(marker["sizes"]) == expected
            assert f"views/{view}/key/c/{shard}" in expected and f"views/{view}/aug/c/{shard}/0" in expected
            for rel, digest in marker["files"].items():
                raw = (store / rel).read_bytes()
                assert hashlib.sha256(raw).hexdigest() == digest and len(raw) == marker["sizes"][rel]
            assert marker["written"] + len(marker["skipped"]) == marker["count"]
            assert marker["slot_start"] == shard * meta["dataset"]["slots_per_shard"]


def test_lease_file_fields_and_heartbeat_as_the_spec_says(tmp_path):
    table = field_table("Lease file")
    with Lease(str(tmp_path), LeaseConfig(timeout_s=0.4)):
        path = tmp_path / "precompute.lease"
        first = json.loads(path.read_text())
        _check_fields([first], table)
        assert set(first) == set(table) and first["command"] == "attncache precompute"
        time.sleep(0.35)
        later = json.loads(path.read_text())
        assert later["heartbeat"] > first["heartbeat"] and later["acquired"] == first["acquired"]
        assert later["token"] == first["token"]
    assert not path.exists()


# ================================================================================ fills and codecs (FORMAT.md)


def fill_table() -> dict[str, object]:
    section = (SCHEMA / "FORMAT.md").read_text().split("## Fill values", 1)[1].split("\n## ", 1)[0]
    return {name: json.loads(value) for name, value in re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", section, re.M)}


def expected_codecs(spec: dict, compression: dict, itemsize: int) -> list[dict]:
    if spec["dtype"] == "str":
        return [{"name": "vlen-utf8", "configuration": {}}, {"name": "zstd", "configuration": {"level": 3,
                                                                                               "checksum": False}}]
    first = {"name": "bytes", "configuration": {"endian": "little"}} if itemsize > 1 else {"name": "bytes"}
    if compression["codec"] == "none":
        return [first]
    if compression["shuffle"] == "none":
        return [first, {"name": "zstd", "configuration": {"level": compression["level"], "checksum": False}}]
    return [first, {"name": "blosc", "configuration": {"typesize": itemsize, "cname": "zstd",
                                                       "clevel": compression["level"],
                                                       "shuffle": {"byte": "shuffle", "bit": "bitshuffle"}[
                                                           compression["shuffle"]], "blocksize": 0}}]


def test_fill_values_and_codecs_as_stated_and_every_file_decodes_by_hand(stores):
    import zarr

    fills = fill_table()
    assert set(fills) == {"key", "label", "valid", "aug", "factors/*"}
    for name, store in stores.items():
        meta, group = _meta(store), zarr.open_group(str(store), mode="r")
        slots = meta["dataset"]["slots_per_shard"]
        for array_name, spec in meta["arrays"].items():
            for view in range(meta["views"]):
                doc = zarr_doc(store, view, spec)
                dtype = np.dtype(object if spec["dtype"] == "str" else spec["dtype"])
                fill = fills.get(array_name, fills["factors/*"])
                assert doc["fill_value"] == fill and doc["data_type"] == {"str": "string"}.get(spec["dtype"],
                                                                                               spec["dtype"])
                assert doc["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                trailing = spec["trailing_shape"]
                inner = slots if array_name in ("key", "label", "valid", "aug") else max(
                    d for d in range(1, min(16, slots) + 1) if slots % d == 0)
                assert doc["shape"] == [meta["dataset"]["num_slots"], *trailing]
                assert doc["chunk_grid"]["configuration"]["chunk_shape"] == [slots, *trailing]
                assert doc["codecs"] == [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [inner, *trailing],
                    "codecs": expected_codecs(spec, meta["compression"], dtype.itemsize),
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end"}}], (name, array_name)
                for shard_index in range(len(meta["dataset"]["shards"])):
                    ours = read_shard_file(store, view, shard_index, spec)
                    theirs = group[f"views/{view}/{spec['path']}"][shard_index * slots:(shard_index + 1) * slots]
                    assert np.array_equal(ours, np.asarray(theirs)), (name, array_name, shard_index)
                    if array_name == "key":
                        valid = read_shard_file(store, view, shard_index, meta["arrays"]["valid"])
                        assert all((k == "") == (not v) for k, v in zip(ours, valid))
        # the skipped sample (shard 0, position 5) and the slots past shard 1's 4 samples hold fills
        for view in range(meta["views"]):
            for slot in (5, slots + 4, 2 * slots - 1):
                assert group[f"views/{view}/key"][slot] == "" and group[f"views/{view}/label"][slot] == -1
                assert group[f"views/{view}/valid"][slot] == 0 and not np.any(group[f"views/{view}/aug"][slot])
    assert {"absent", ("chunks", 1), ("chunks", 2)} <= MET
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


def test_the_spec_reader_imports_nothing_of_attncache():
    import ast

    tree = ast.parse((Path(__file__).parent / "spec_reader.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules and not [m for m in modules if m.startswith(("attncache", "pipeline", "storage_schema", "torch",
                                                                "timm", "zarr"))], sorted(modules)

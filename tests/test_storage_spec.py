"""storage_schema's documents held true against real stores made by `precompute`.

Everything a reader in another language is told is re-done here from the documents' words, with
numpy (and Pillow where REPLAY.md says only Pillow gives the same pixels), never through the code
that wrote the store: the replay of every op from a stored `aug` row, the cache id's bytes, every
field of the metadata, marker and lease, the fill values, and the codecs decoded by hand (shard index,
crc32c, zstd, vlen-utf8, byte order). The project's own functions appear only as what is compared
against. The field tables are parsed from storage_schema/FIELDS.md, so a field added to the store
without a row there (or a row for a field that no store has) fails here.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

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
             + ")|normalize(" + IMAGENET + ",std=(0.229,0.224,0.225))|erase(p=0.8)|mix", "lowrank:r=4:int8", "zstd:3", 2),
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


# ================================================================================ hand decoding (FORMAT.md)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _zarr_doc(store: Path, view: int, spec: dict) -> dict:
    return json.loads((store / f"views/{view}/{spec['path']}/zarr.json").read_text())


def _decode_inner(raw: bytes, codecs: list[dict], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """One inner chunk: the codecs undone in reverse order, as FORMAT.md lists them."""
    import numcodecs

    for codec in reversed(codecs[1:]):
        if codec["name"] == "zstd":
            raw = numcodecs.Zstd().decode(raw)
        elif codec["name"] == "blosc":
            raw = numcodecs.Blosc().decode(raw)
        else:
            raise AssertionError(f"codec {codec['name']} is not in FORMAT.md")
    raw = bytes(raw)
    if codecs[0]["name"] == "vlen-utf8":
        (count,), offset, items = struct.unpack_from("<I", raw), 4, []
        for _ in range(count):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + length].decode("utf-8"))
            offset += 4 + length
        assert offset == len(raw)
        return np.array(items, dtype=object).reshape(shape)
    assert codecs[0]["name"] == "bytes"
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


MET: set = set()  # which layouts the hand decoder met


def read_shard_file(store: Path, view: int, shard_index: int, spec: dict) -> np.ndarray:
    """A unit's block of one array from its one Zarr shard file, by FORMAT.md's words alone."""
    doc = _zarr_doc(store, view, spec)
    config = doc["codecs"][0]["configuration"]
    slots, inner = doc["chunk_grid"]["configuration"]["chunk_shape"][0], config["chunk_shape"]
    ndim = 1 + len(spec["trailing_shape"])
    raw = (store / "/".join([f"views/{view}/{spec['path']}", "c", str(shard_index)] + ["0"] * (ndim - 1))).read_bytes()
    n_chunks = slots // inner[0]
    index_bytes, digest = raw[-(16 * n_chunks + 4):-4], raw[-4:]
    assert struct.unpack("<I", digest)[0] == crc32c(index_bytes), "shard index fails its crc32c"
    index = struct.unpack(f"<{2 * n_chunks}Q", index_bytes)
    dtype = {"str": object}.get(spec["dtype"], spec["dtype"])
    fill = {"str": ""}.get(spec["dtype"], doc["fill_value"])
    blocks = []
    for chunk in range(n_chunks):
        offset, nbytes = index[2 * chunk], index[2 * chunk + 1]
        MET.add(("chunks", n_chunks))
        if offset == nbytes == 2 ** 64 - 1:
            MET.add("absent")
            blocks.append(np.full(inner, fill, dtype=dtype))
        else:
            blocks.append(_decode_inner(raw[offset:offset + nbytes], config["codecs"], dtype, tuple(inner)))
    return np.concatenate(blocks)


# ================================================================================ replay by REPLAY.md's words

FILTERS = {0: Image.NEAREST, 1: Image.BILINEAR, 2: Image.BICUBIC}
NAMED_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
RANDAUG = {0: ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"),
           1: ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
               "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
               "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")}
ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast, "Brightness": ImageEnhance.Brightness,
           "Sharpness": ImageEnhance.Sharpness}


def _lut(image: Image.Image, table) -> Image.Image:
    """A per-byte table applied to every channel: portable, numpy only."""
    lut = np.array([table(i) for i in range(256)], dtype=np.uint8)
    return Image.fromarray(lut[np.asarray(image)], "RGB")


def spec_randaug_op(name: str, magnitude: float, sign: float, image: Image.Image, fill, resample) -> Image.Image:
    frac = magnitude / 10.0
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return _lut(image, lambda i: 255 - i)
    if name == "Rotate":
        return image.rotate(sign * frac * 30.0, resample=resample, fillcolor=fill)
    if name.startswith("Posterize"):
        bits = max(1, int(frac * 4)) if name == "Posterize" else max(1, 4 - int(frac * 4))
        return image if bits >= 8 else _lut(image, lambda i: i & (0xFF << (8 - bits)) & 0xFF)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        thresh = min(256, int(frac * 256))
        thresh = thresh if name == "Solarize" else 256 - thresh
        return _lut(image, lambda i: 255 - i if i >= thresh else i)
    if name == "SolarizeAdd":
        add = min(128, int(frac * 110))
        return _lut(image, lambda i: min(255, i + add) if i < 128 else i)
    if name in ENHANCE:
        return ENHANCE[name](image).enhance(frac * 1.8 + 0.1)
    if name.endswith("Increasing"):
        return ENHANCE[name[:-len("Increasing")]](image).enhance(max(0.1, 1.0 + sign * frac * 0.9))
    w, h = image.size
    matrix = {"ShearX": (1, sign * frac * 0.3, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * frac * 0.3, 1, 0),
              "TranslateXRel": (1, 0, sign * frac * 0.45 * w, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, sign * frac * 0.45 * h)}[name]
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def spec_jitter(args: dict, p: np.ndarray, image: Image.Image) -> Image.Image:
    for index in p[4:8].astype(int):
        name = ("brightness", "contrast", "saturation", "hue")[index]
        if args[name] <= 0:
            continue
        if name == "hue":
            h, s, v = image.convert("HSV").split()
            shift = int(p[3] * 255) % 256  # truncated toward zero, then wrapped to a byte
            h = Image.fromarray(((np.asarray(h, dtype=np.uint16) + shift) % 256).astype(np.uint8), "L")
            image = Image.merge("HSV", (h, s, v)).convert("RGB")
        else:
            enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                        "saturation": ImageEnhance.Color}[name]
            image = enhancer(image).enhance(float(p[index]))
    return image


def spec_center_crop(x_HWC: np.ndarray, size: int) -> np.ndarray:
    h, w = x_HWC.shape[:2]
    if size > w or size > h:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        x_HWC = np.pad(x_HWC, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = x_HWC.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x_HWC[top:top + size, left:left + size]


def spec_apply(ops: list[dict], layout: list[dict], row: np.ndarray, image: Image.Image) -> np.ndarray:
    """Every op before `mix`, on one sample: float32 [3, S, S]."""
    x = image
    for op, part in zip(ops, layout):
        name, args, p = op["op"], op["args"], row[part["offset"]:part["offset"] + part["length"]]
        if name == "rrc":
            top, left, h, w, code = (int(v) for v in p)
            x = x.crop((left, top, left + w, top + h)).resize((args["size"], args["size"]), FILTERS[code])
        elif name == "flip":
            x = Image.fromarray(np.ascontiguousarray(np.asarray(x)[:, ::-1]), "RGB") if p[0] else x
        elif name == "jitter":
            x = spec_jitter(args, p, x)
        elif name == "randaug":
            fill = tuple(int(round(c * 255)) for c in args["mean"])
            for index, applied, magnitude, sign in p.reshape(-1, 4):
                if applied:
                    x = spec_randaug_op(RANDAUG[args["inc"]][int(index)], float(magnitude), float(sign), x, fill,
                                        NAMED_FILTERS[args["interpolation"]])
        elif name == "resize":
            w, h = x.size
            short, long = min(w, h), max(w, h)
            new_long = int(args["size"] * long / short)
            x = x.resize((args["size"], new_long) if w <= h else (new_long, args["size"]),
                         NAMED_FILTERS[args["interpolation"]])
        elif name == "center_crop":
            x = Image.fromarray(np.ascontiguousarray(spec_center_crop(np.asarray(x), args["size"])), "RGB")
        elif name == "normalize":
            x = np.asarray(x, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
            x = (x - np.float32(args["mean"])[:, None, None]) / np.float32(args["std"])[:, None, None]
        elif name == "erase":
            applied, top, left, h, w, seed = (int(v) for v in p)
            if applied:
                x = x.copy()
                x[:, top:top + h, left:left + w] = np.random.default_rng(seed).standard_normal((3, h, w),
                                                                                              dtype=np.float32)
        else:
            assert name == "mix"
    return x


def spec_mix(row: np.ndarray, x: np.ndarray, partner: np.ndarray) -> np.ndarray:
    applied, _, lam, cutmix, top, left, h, w = row
    if not applied:
        return x
    if cutmix:
        top, left, h, w = int(top), int(left), int(h), int(w)
        out = x.copy()
        out[:, top:top + h, left:left + w] = partner[:, top:top + h, left:left + w]
        return out
    return x * np.float32(lam) + partner * np.float32(1.0 - lam)


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


def _number(x: float) -> str:
    """FORMAT.md's float rule, from the shortest round-trip digits (numpy's Dragon4, not Python's repr)."""
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    sci = np.format_float_scientific(x, unique=True, trim="-", exp_digits=1)  # e.g. "-1.25e-5"
    mantissa, exponent = sci.split("e")
    sign, digits = ("-", mantissa[1:]) if mantissa.startswith("-") else ("", mantissa)
    digits, exponent = digits.replace(".", ""), int(exponent)
    if -4 <= exponent < 16:
        if exponent >= 0:
            whole = (digits + "0" * (exponent + 1))[:exponent + 1]
            frac = digits[exponent + 1:] or "0"
        else:
            whole, frac = "0", "0" * (-exponent - 1) + digits
        return f"{sign}{whole}.{frac}"
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mant}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ord(ch) > 0x7E:
            units = ch.encode("utf-16-be")
            out.extend(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def canonical(value) -> str:
    """FORMAT.md's canonical JSON, written out by hand (no json module)."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(f"{_string(k)}:{canonical(value[k])}" for k in sorted(value)) + "}"


def spec_keyed(meta: dict) -> dict:
    keyed = {k: meta[k] for k in ("schema_version", "recipe", "seed", "layers", "heads", "encoding", "compression",
                                  "compute")}
    keyed["teacher"] = {k: meta["teacher"][k] for k in ("name", "model_args", "weights_sha256")}
    return keyed


def spec_cache_id(meta: dict) -> str:
    return hashlib.sha256(canonical(spec_keyed(meta)).encode("ascii")).hexdigest()


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
        assert _number(x) == json.dumps(x), x
    for text in ("plain", 'quote " and back\\slash', "tab\t new\nline \x01 \x7f", "caf\u00e9", "\U0001f600"):
        assert _string(text) == json.dumps(text), text


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
            expected = {"/".join([f"views/{view}/{spec['path']}", "c", str(shard)] + ["0"] * len(spec["trailing_shape"]))
                        for spec in meta["arrays"].values()}
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
                doc = _zarr_doc(store, view, spec)
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

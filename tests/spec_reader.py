"""An independent reader of attncache stores, written from storage_schema's pages alone.

It imports nothing of attncache: numpy, Pillow (where REPLAY.md says only Pillow gives the same
pixels) and numcodecs' zstd / blosc decoders, so tests/test_storage_spec.py can compare what these
pages say with what the project writes and replays. Three parts: the bytes of a Zarr shard file
(FORMAT.md "Codecs"), every augmentation op on a stored `aug` row (REPLAY.md), and the canonical JSON
hashed into the cache id (FORMAT.md "The cache id").
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# ================================================================================ shard files (FORMAT.md)

def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def zarr_doc(store: Path, view: int, spec: dict) -> dict:
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
    doc = zarr_doc(store, view, spec)
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


# ================================================================================ replay (REPLAY.md)

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


# ================================================================================ cache id (FORMAT.md)

def json_number(x: float) -> str:
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


def json_string(s: str) -> str:
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
        return json_number(value)
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(f"{json_string(k)}:{canonical(value[k])}" for k in sorted(value)) + "}"


def spec_keyed(meta: dict) -> dict:
    keyed = {k: meta[k] for k in ("schema_version", "recipe", "seed", "layers", "heads", "encoding", "compression",
                                  "compute")}
    keyed["teacher"] = {k: meta["teacher"][k] for k in ("name", "model_args", "weights_sha256")}
    return keyed


def spec_cache_id(meta: dict) -> str:
    return hashlib.sha256(canonical(spec_keyed(meta)).encode("ascii")).hexdigest()

"""Shared and power-of-two scales (pipeline/encodings/shared_scales.py): round trips within the scale's
rounding bound on seeded random shapes (zeros, huge and tiny rows, an all-zero row), non-finite input
refused, spec and metadata round trips, fidelity against the per-row float16 form, pinned bytes, and a
store written with each scheme read back through the training loader."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.encodings.codecs import ROW_CODECS
from attncache.pipeline.encodings.finite import NonFiniteValues
from attncache.pipeline.encodings.kl import attention_kl, exact_logits
from attncache.pipeline.encodings.shared_scales import SCHEMES, shared_scale_rows
from attncache.pipeline.encodings.spec import encoding_from_json, parse_encoding

from tests.assets.encoding_pins import PLATFORM, eigh_form, fingerprint, pinned_form
from tests.assets.shared_scale_pins import NEW_SPECS

PINNED = json.loads((Path(__file__).parent / "assets" / "shared_scale_pins.json").read_text())
QUANTS = ("int8", "int4", "fp8")
CODECS = [(q, s) for q in QUANTS for s in SCHEMES]


def random_rows(seed: int) -> torch.Tensor:
    """[B, L, H, N, w] with a random shape and magnitudes spanning 1e-30 .. 1e6 per row, zeros inside
    rows, one all-zero row, one all-zero token (every head)."""
    g = torch.Generator().manual_seed(seed)
    B, L, H, N = (int(torch.randint(1, 4, (), generator=g)) for _ in range(4))
    w = int(torch.randint(1, 10, (), generator=g))
    x = torch.randn(B, L, H, N, w, generator=g)
    x = x * torch.pow(10.0, torch.randint(-30, 7, (B, L, H, N, 1), generator=g).float())
    x[torch.rand(x.shape, generator=g) < 0.2] = 0.0
    x[0, 0, 0, 0] = 0.0
    x[-1, -1, :, -1] = 0.0
    return x


def _bound(quant: str, scale: torch.Tensor) -> torch.Tensor:
    """Largest error per element: half a step for integers, e4m3's relative half-ulp (1/16) of the
    largest value (448 s) for fp8."""
    return scale * (0.5 if quant != "fp8" else 448.0 / 16)


@pytest.mark.parametrize("quant,scheme", CODECS)
@pytest.mark.parametrize("seed", range(6))
def test_round_trip_is_within_half_a_step_of_the_groups_scale(quant, scheme, seed):
    codec = shared_scale_rows(ROW_CODECS[quant], scheme)
    x = random_rows(seed)
    if not scheme.endswith("pow2"):
        x = x.clamp(-1e6, 1e6)
    stored = codec.encode("a", x)
    got = codec.decode("a", stored, "cpu", x.shape[-1])
    assert got.shape == x.shape and got.dtype == torch.float32
    amax = x.abs().amax(-1, keepdim=True)
    if codec.per_token:
        amax = amax.amax(-3, keepdim=True)
    qmax = ROW_CODECS[quant].qmax
    if scheme.endswith("pow2"):
        scale = torch.exp2(torch.ceil(torch.log2((amax / qmax).double())).clamp(-127, 127)).float()
        scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        e = stored[codec._scale_name("a")]
        assert e.dtype == np.int8 and np.all((e >= -127) & (e <= 127))
    else:
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).clamp(2.0 ** -14, 65504.0)
        scale = scale.to(torch.float16).float()
    assert bool(((got - x).abs() <= _bound(quant, scale) * 1.001 + 1e-45).all())
    assert bool((got[0, 0, 0, 0] == 0).all()) and bool((got[-1, -1, :, -1] == 0).all())  # zero rows stay zero
    scale_shape = x.shape[:-3] + x.shape[-2:-1] if codec.per_token else x.shape[:-1]
    assert stored[codec._scale_name("a")].shape == scale_shape


@pytest.mark.parametrize("quant,scheme", CODECS)
def test_non_finite_input_is_refused_before_anything_is_made(quant, scheme):
    codec = shared_scale_rows(ROW_CODECS[quant], scheme)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 3, 2, 5, 4)
        x[1, 2, 0, 3, 1] = bad
        with pytest.raises(NonFiniteValues) as refused:
            codec.encode("a", x)
        assert (refused.value.sample, refused.value.layer) == (1, 2)


def test_float16_token_scales_refuse_values_past_their_range_and_exponents_take_them():
    x = torch.full((1, 1, 2, 3, 4), 1e9)
    with pytest.raises(NonFiniteValues, match="float16 row scale"):
        shared_scale_rows(ROW_CODECS["int8"], "token").encode("a", x)
    codec = shared_scale_rows(ROW_CODECS["int8"], "token-pow2")
    got = codec.decode("a", codec.encode("a", x), "cpu", 4)
    assert bool(((got - x).abs() <= x * 0.01).all())


def test_a_token_scale_serves_every_head_and_is_set_by_the_largest():
    x = torch.zeros(1, 1, 3, 2, 4)
    x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :] = 1.0, 10.0, 127.0
    stored = shared_scale_rows(ROW_CODECS["int8"], "token").encode("a", x)
    assert stored["a_token_scale"].shape == (1, 1, 2) and np.all(stored["a_token_scale"] == 1.0)
    assert stored["a"][0, 0, :, 0, 0].tolist() == [1, 10, 127]
    pow2 = shared_scale_rows(ROW_CODECS["int8"], "row-pow2").encode("a", x)
    assert pow2["a_exp"][0, 0, :, 0].tolist() == [-6, -3, 0]  # 1/127 <= 2^-6, 10/127 <= 2^-3, 127/127 = 2^0


SPECS = [f"lowrank:r=8:{q}:scale={s}" for q, s in CODECS]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_and_metadata_round_trip(spec):
    enc = parse_encoding(spec)
    assert enc.spec == spec and parse_encoding(enc.spec) == enc and encoding_from_json(enc.to_json()) == enc
    meta = enc.to_json()
    assert meta["quant"] in QUANTS and meta["scale"] in SCHEMES and json.loads(json.dumps(meta)) == meta
    assert parse_encoding(spec.replace(":scale=", " : scale=")) == enc


def test_scale_row_is_the_existing_form_and_float_rows_refuse_a_scale():
    assert parse_encoding("lowrank:r=8:int8:scale=row") == parse_encoding("lowrank:r=8:int8")
    assert parse_encoding("lowrank:r=8:int8:scale=row").to_json() == parse_encoding("lowrank:r=8:int8").to_json()
    with pytest.raises(SpecError, match="scale=token needs scaled rows"):
        parse_encoding("lowrank:r=8:fp16:scale=token")
    with pytest.raises(SpecError, match="unknown part 'scale=layer'"):
        parse_encoding("lowrank:r=8:int8:scale=layer")


def test_the_store_schema_accepts_the_new_metadata():
    import jsonschema
    from attncache.storage_schema import __file__ as schema_init
    schema = json.loads((Path(schema_init).parent / "store_v2.json").read_text())
    enc_schema = schema["properties"]["attncache"]["properties"]["encoding"] if "attncache" in schema.get(
        "properties", {}) else _find(schema, "encoding")
    for spec in SPECS:
        jsonschema.validate(parse_encoding(spec).to_json(), enc_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**parse_encoding(SPECS[0]).to_json(), "scale": "layer"}, enc_schema)


def _find(node, key):
    if isinstance(node, dict):
        if key in node.get("properties", {}):
            return node["properties"][key]
        for v in node.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("quant", QUANTS)
def test_fidelity_of_shared_scales_stays_near_the_per_row_form(quant):
    """Trained-like attention (peaked, correlated Q/K): token-shared and power-of-two scales cost at most
    a few times the per-row float16 form's KL, never orders of magnitude."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 2, 3, 33, 16, generator=g)
    q = base * 2 + 0.3 * torch.randn(base.shape, generator=g)
    k = base * 2 + 0.3 * torch.randn(base.shape, generator=g)
    scale = 16 ** -0.5
    ref = exact_logits(q, k, scale)

    def kl(spec):
        enc = parse_encoding(spec)
        return float(attention_kl(ref, enc.decode_logits(enc.encode(q, k, scale), scale)).mean())

    per_row = kl(f"lowrank:r=16:{quant}")
    for scheme in SCHEMES:
        assert kl(f"lowrank:r=16:{quant}:scale={scheme}") <= max(8 * per_row, 1e-6), scheme


@pytest.mark.parametrize("spec", NEW_SPECS)
def test_new_specs_write_their_pinned_bytes(spec):
    got, pin = pinned_form(fingerprint(eigh_form(spec)), spec), PINNED["pins"][spec]
    for field in ("spec", "serves_qk", "json", "cache_id", "arrays"):
        assert got[field] == pin[field], field
    if PLATFORM != PINNED["platform"]:
        pytest.skip(f"BLAS/LAPACK results pinned on {PINNED['platform']}, this is {PLATFORM}")
    assert got["encoded"] == pin["encoded"] and got["decoded"] == pin["decoded"]


@pytest.mark.parametrize("spec", ["lowrank:r=4:int4:scale=token-pow2", "lowrank:r=4:int8:scale=token"])
def test_a_store_of_each_scheme_is_read_by_the_training_loader_and_its_scales_are_checksummed(
        spec, synth_data, tmp_path):
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.teacher.model import TeacherConfig
    from attncache.pipeline.train.loader import CacheCorrupt, StreamConfig, epoch_loader, match_shards

    from conftest import TINY_TEACHER

    teacher = TeacherConfig(TINY_TEACHER["model"], tuple(sorted(TINY_TEACHER["model_args"].items())), random_init=True)
    out = tmp_path / "c.zarr"
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(out), teacher=teacher, views=1, recipe="train",
                                    encoding=spec, layers=":", batch_size=64, workers=0, threads=2, progress=False))
    store = CacheStore.open(out)
    assert store.encoding == parse_encoding(spec) and store.meta["encoding"]["scale"] == spec.rsplit("=", 1)[1]
    stream = StreamConfig(match_shards(store, (synth_data["val"],)), tuple(store.meta["recipe"]["ops"]), 4,
                          store.path, 0, 1)
    batch = next(iter(epoch_loader(stream, 0, 8, 0)))
    scale_name = "a_token_exp" if spec.endswith("pow2") else "a_token_scale"
    assert scale_name in batch["factors"] and "a_scale" not in batch["factors"]
    logits = store.encoding.decode_logits(batch["factors"], 1.0)
    n = store.meta["tokens"]["count"]
    assert logits.shape == (8, len(store.meta["layers"]), len(store.meta["heads"]), n, n)
    assert bool(torch.isfinite(logits).all()) and float(logits.abs().max()) > 0
    marker = store.read_marker(0, 0)
    rel = sorted(r for r in marker["files"] if f"/factors/{scale_name}" in r)[0]
    raw = bytearray((out / rel).read_bytes())
    raw[len(raw) // 2] ^= 0x40
    (out / rel).write_bytes(bytes(raw))
    with pytest.raises(CacheCorrupt, match="checksum mismatch"):
        list(epoch_loader(stream, 0, 4, 0))

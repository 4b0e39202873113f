"""`attncache bench fidelity`: the frontier for a teacher or a store, every option reaching its use."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from attncache.cli.main import cli
from attncache.pipeline.encodings.spec import parse_encoding
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.layout import parse_compression
from attncache.pipeline.teacher.model import TeacherConfig
from attncache.pipeline.tools.fidelity import stored_bytes

TINY = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "depth=3",
        "--model-arg", "embed_dim=48", "--model-arg", "num_heads=3"]
RANDOM_TEACHER = ["vit_tiny_patch16_224", "--random-init", *TINY]
FEW = ["--encodings", "exact:fp32 exact:fp16 lowrank:r=8:int8", "--encodings", "lowrank:r=2:fp16"]


def _bench(*args, ok=True):
    result = CliRunner().invoke(cli, ["bench", "fidelity", *map(str, args)])
    if ok:
        assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


def _json(*args) -> dict:
    report = json.loads(_bench(*args, "--json").stdout)
    return report


@pytest.fixture(scope="module")
def base_report(synth_data):
    return _json(*RANDOM_TEACHER, "--data", synth_data["val"], "--samples", 6, *FEW)


def test_help_lists_every_option_with_its_default():
    for command in (["bench"], ["bench", "fidelity"]):
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
    text = CliRunner().invoke(cli, ["bench", "fidelity", "--help"]).output
    assert "default: 32" in text and "lowrank:r=32:int8" in text and "--out-png" in text


def test_teacher_mode_reports_kl_bytes_and_speed_for_every_encoding(base_report):
    rows = {r["encoding"]: r for r in base_report["results"]}
    assert list(rows) == ["exact:fp32", "exact:fp16", "lowrank:r=8:int8", "lowrank:r=2:fp16"]
    assert rows["exact:fp32"]["kl_mean"] == 0.0  # the reference decodes to the teacher's own logits
    assert rows["lowrank:r=2:fp16"]["kl_mean"] > rows["lowrank:r=8:int8"]["kl_mean"] > 0
    layers, heads, n, d = 3, 3, 17, 16
    assert rows["exact:fp16"]["raw_bytes_per_sample"] == 2 * layers * heads * n * d * 2
    assert rows["lowrank:r=8:int8"]["raw_bytes_per_sample"] == 2 * layers * heads * n * (8 + 2)
    for r in rows.values():
        assert len(r["kl_per_layer"]) == layers and r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0
        assert 0 < r["bytes_per_sample"] and r["encode_samples_s"] > 0 and r["decode_samples_s"] > 0
    assert rows["exact:fp16"]["x_smaller_than_exact_fp16"] == 1.0
    assert base_report["random_init"] and "RANDOM" in base_report["warnings"][0]
    assert base_report["samples"] == 6 and base_report["tokens"] == n


def test_each_encoding_is_stored_with_its_own_compressor_unless_one_is_given(synth_data):
    """Without --compression the grid's bytes are what a precompute of each encoding would store: int4
    rows with zstd:3:shuffle, exact 16-bit float rows with zstd:1:shuffle:block=1M, the rest zstd:3
    (pipeline/encodings/default.py)."""
    grid = ["--encodings", "exact:bf16 lowrank:r=2:int4 lowrank:r=8:int8"]
    own = _json(*RANDOM_TEACHER, "--data", synth_data["val"], "--samples", 4, *grid)
    given = _json(*RANDOM_TEACHER, "--data", synth_data["val"], "--samples", 4, *grid, "--compression", "zstd:3")
    assert own["compression"] == "each encoding's own default" and given["compression"] == "zstd:3"
    assert [r["compression"] for r in own["results"]] == ["zstd:1:shuffle:block=1M", "zstd:3:shuffle", "zstd:3"]
    assert [r["compression"] for r in given["results"]] == ["zstd:3"] * 3
    own_bytes, given_bytes = ([r["bytes_per_sample"] for r in rep["results"]] for rep in (own, given))
    assert own_bytes[2] == given_bytes[2] and own_bytes[1] != given_bytes[1]  # same compressor, same bytes
    assert [r["kl_mean"] for r in own["results"]] == [r["kl_mean"] for r in given["results"]]


def test_table_plot_and_random_weights_warning(synth_data, tmp_path):
    png = tmp_path / "frontier.png"
    result = _bench(*RANDOM_TEACHER, "--data", synth_data["val"], "--samples", 4, *FEW, "--out-png", png)
    assert "| `lowrank:r=8:int8` | no |" in result.stdout and "KL layer 2" in result.stdout
    assert "WARNING" in result.stdout and "RANDOM" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stored_bytes_are_what_the_store_writes(synth_data, tmp_path):
    """The scratch measurement and a real store agree on the bytes of the same arrays."""
    cfg = PrecomputeConfig(data=(synth_data["val"],), out=str(tmp_path / "s.zarr"),
                           teacher=TeacherConfig("vit_tiny_patch16_224", (("depth", 3), ("embed_dim", 48),
                                                                          ("img_size", 32), ("num_heads", 3),
                                                                          ("patch_size", 8)), random_init=True),
                           views=1, recipe="eval", encoding="lowrank:r=4:int4", batch_size=32, workers=0, threads=1,
                           progress=False)
    run_precompute(cfg)
    store = CacheStore.open(cfg.out)
    data = store.read_unit(0, 0)
    assert data.valid.all()
    assert store.meta["compression"] == parse_compression("zstd:3:shuffle")  # int4 rows' own compressor
    measured = sum(stored_bytes(data.factors, store.meta["compression"]).values())
    assert measured == store.unit_factor_bytes(store.units()[0])


@pytest.mark.parametrize("option,value,check", [
    ("--samples", 3, lambda r, base: r["samples"] == 3),
    ("--layers", "1:", lambda r, base: r["layers"] == [1, 2] and len(r["results"][0]["kl_per_layer"]) == 2),
    ("--heads", "0,2", lambda r, base: r["heads"] == [0, 2]
     and r["results"][1]["raw_bytes_per_sample"] == 2 * 3 * 2 * 17 * 16 * 2),
    ("--batch-size", 2, lambda r, base: r["batch_size"] == 2),
    ("--threads", 1, lambda r, base: r["threads"] == 1),
    ("--compression", "none", lambda r, base: r["compression"] == "none"
     and r["results"][1]["raw_bytes_per_sample"] <= r["results"][1]["bytes_per_sample"]
     != base["results"][1]["bytes_per_sample"]),
    # other pixels or weights: other attention, so another KL
    ("--recipe", "train", lambda r, base: r["recipe"].startswith("rrc")
     and r["results"][2]["kl_mean"] != base["results"][2]["kl_mean"]),
    ("--seed", 7, lambda r, base: r["weights_sha256"] != base["weights_sha256"]
     and r["results"][2]["kl_mean"] != base["results"][2]["kl_mean"]),
    ("--model-arg", "depth=2", lambda r, base: r["layers"] == [0, 1]),
])
def test_every_option_reaches_its_use(synth_data, base_report, option, value, check):
    report = _json(*RANDOM_TEACHER, "--data", synth_data["val"], "--samples", 6, *FEW, option, value)
    assert check(report, base_report), report


def test_device_and_data_options_reach_their_use(synth_data):
    report = _json(*RANDOM_TEACHER, "--data", synth_data["train"], "--samples", 2, "--device", "cpu", *FEW)
    assert report["device"] == "cpu" and report["samples"] == 2


def test_default_grid_skips_ranks_above_the_head_dim_and_names_them(synth_data):
    report = _json(*RANDOM_TEACHER, "--data", synth_data["val"], "--samples", 2)
    specs = [r["encoding"] for r in report["results"]]
    assert "exact:fp16" in specs and "lowrank:r=8:int4" in specs and "lowrank:r=16:fp8" in specs
    assert not any(s.startswith("lowrank:r=32") for s in specs)
    assert any("lowrank:r=32:int8" in n and "head dim" in n for n in report["notes"])


def test_bad_requests_are_usage_errors(synth_data):
    cases = [([*RANDOM_TEACHER, "--samples", 2], "--data"),
             ([*RANDOM_TEACHER, "--data", synth_data["val"], "--encodings", "lowrank:r=32:int8"], "head dim"),
             ([*RANDOM_TEACHER, "--data", synth_data["val"], "--encodings", "lowrank:r=4:int3"], "int3"),
             ([*RANDOM_TEACHER, "--data", synth_data["val"], "--encodings", "lowrank:r=4,4:int8"], "2 ranks but 3")]
    for args, says in cases:
        result = _bench(*args, ok=False)
        assert result.exit_code == 2 and says in result.stderr, (args, result.stderr)


def test_trained_teacher_has_no_warning_and_kl_grows_as_rank_drops(trained_teacher_dir, synth_data):
    report = _json(trained_teacher_dir, "--data", synth_data["val"], "--samples", 8,
                   "--encodings", "exact:fp16 lowrank:r=8:fp16 lowrank:r=4:fp16 lowrank:r=2:fp16 lowrank:r=1:fp16")
    assert not report["random_init"] and report["warnings"] == []
    kl = [r["kl_mean"] for r in report["results"]]
    assert kl == sorted(kl) and kl[-1] > 100 * kl[1]


# ---------------------------------------------------------------------------------------------- store mode


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, trained_teacher_dir, synth_data):
    out = tmp_path_factory.mktemp("fid") / "trained.zarr"
    cfg = PrecomputeConfig(data=(synth_data["val"],), out=str(out), teacher=TeacherConfig(str(trained_teacher_dir)),
                           views=2, encoding="lowrank:r=2,4,4,8:int4", layers=":", batch_size=32, workers=0, threads=1,
                           progress=False)
    run_precompute(cfg)
    return out


def test_store_mode_scores_the_cached_bytes_against_the_re_run_teacher(trained_store, trained_teacher_dir):
    report = _json(trained_store, "--teacher", trained_teacher_dir, "--samples", 10, "--view", 1)
    cached, fresh, exact = report["results"]
    assert cached["encoding"] == "lowrank:r=2,4,4,8:int4 (store)" and fresh["encoding"] == "lowrank:r=2,4,4,8:int4"
    assert exact["encoding"] == "exact:fp16" and report["view"] == 1 and report["samples"] == 10
    np.testing.assert_allclose(cached["kl_per_layer"], fresh["kl_per_layer"], rtol=1e-3, atol=1e-7)
    # the int4 rank schedule loses more than exact fp16 on every layer (which layer needs more rank
    # depends on the teacher, so layers are not compared with each other)
    assert all(c > e for c, e in zip(cached["kl_per_layer"], exact["kl_per_layer"]))
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(trained_store), "--json"]).output)
    assert cached["bytes_per_sample"] == info["bytes_per_sample"]
    # the store's own compressor, the one its encoding (int4 rows) gets by default
    assert report["compression"] == cached["compression"] == fresh["compression"] == "zstd:3:shuffle"
    assert exact["compression"] == "zstd:3:shuffle" and not report["random_init"]
    other = _json(trained_store, "--teacher", trained_teacher_dir, "--samples", 4, "--encodings", "exact:int8",
                  "--compression", "none")
    assert [r["encoding"] for r in other["results"]] == ["lowrank:r=2,4,4,8:int4 (store)", "exact:int8"]
    assert other["compression"] == "none"


def test_store_mode_refuses_other_weights_and_teacher_mode_options(trained_store, synth_data, tmp_path):
    result = _bench(trained_store, "--samples", 2, ok=False)  # trained weights: the teacher must be named
    assert result.exit_code == 2 and "--teacher-checkpoint" in result.stderr
    result = _bench(trained_store, "--random-init", *TINY[:2], "--samples", 2, ok=False)
    assert result.exit_code == 2 and "differ from the store's teacher" in result.stderr
    result = _bench(trained_store, "--data", synth_data["val"], ok=False)
    assert result.exit_code == 2 and "STORE mode" in result.stderr


def test_store_mode_finds_a_random_init_stores_weights_itself(synth_data, tmp_path):
    out = tmp_path / "r.zarr"
    cfg = PrecomputeConfig(data=(synth_data["val"],), out=str(out), seed=5,
                           teacher=TeacherConfig("vit_tiny_patch16_224", (("depth", 2), ("embed_dim", 48),
                                                                          ("img_size", 32), ("num_heads", 3),
                                                                          ("patch_size", 8)), random_init=True, seed=5),
                           encoding="exact:fp8", batch_size=32, workers=0, threads=1, progress=False)
    run_precompute(cfg)
    report = _json(out, "--samples", 3)
    assert report["random_init"] and report["results"][0]["encoding"] == "exact:fp8 (store)"
    assert report["results"][0]["kl_mean"] == pytest.approx(report["results"][1]["kl_mean"], rel=1e-3)
    assert parse_encoding("exact:fp8").serves_qk

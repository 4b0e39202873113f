"""Teachers that would be cached wrong or cannot load: the self-check, non-finite Q/K, damaged files.
Each case asserts the one-line error text and that --out was never created (or holds no done unit)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability.relhelp import invoke, noise_shards

TINY = {"depth": 3, "embed_dim": 48, "img_size": 32, "num_heads": 3, "patch_size": 8}


def _cfg(name, **extra):
    from attncache.pipeline.teacher.model import TeacherConfig
    return TeacherConfig(name, tuple(sorted({**TINY, **extra}.items())), random_init=True)


@pytest.mark.parametrize("name", ["vit_relpos_base_patch16_224", "vit_srelpos_small_patch16_224",
                                  "vit_relpos_medium_patch16_cls_224"])
def test_relative_position_bias_teachers_are_refused_by_the_self_check(name):
    from attncache.pipeline.teacher.model import Teacher, TeacherError
    with pytest.raises(TeacherError) as err:
        Teacher(_cfg(name))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{name}: self-check failed at layer 0")
    assert float(text.split(" by ")[1].split()[0]) > 1e-3  # the size of the difference is named


def test_the_self_check_decides_by_the_model_not_by_a_name(monkeypatch):
    """A RoPE teacher with the name pre-check switched off is still refused, by its attention."""
    import attncache.pipeline.teacher.model as teacher
    monkeypatch.setattr(teacher, "check_supported", lambda model, name: None)
    with pytest.raises(teacher.TeacherError, match="self-check failed at layer 0"):
        teacher.Teacher(teacher.TeacherConfig("eva02_tiny_patch14_224", (("depth", 2), ("img_size", 28)),
                                              random_init=True))


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"},
                                   {"qk_norm": True}])
def test_plain_register_and_no_class_token_vits_pass_with_float_rounding_only(extra):
    from attncache.pipeline.teacher.model import Teacher
    from attncache.pipeline.teacher.self_check import check_layers, probe_images
    t = Teacher(_cfg("vit_tiny_patch16_224", **extra))
    layers = tuple(range(t.num_layers))
    # the self-check's capture (Teacher.self_check): the same Q/K as `capture`, with the last layer's
    # attention run through so that its output can be replayed
    results = [check_layers([b.attn for b in t.model.blocks], lambda x: t._capture(x, layers, None), probe_images(32),
                            t.scale) for _ in range(2)]
    assert [r.layer for r in results[0]] == [0, 1, 2]
    assert all(r.difference < 1e-5 for r in results[0])
    assert results[0] == results[1]  # deterministic


def _teacher_dir(root: Path, name: str, config: str | None = None, weights: bytes | None = None) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(config if config is not None else
                                   json.dumps({"model": "vit_tiny_patch16_224", "model_args": TINY}))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


@pytest.fixture(scope="module")
def good_weights(tmp_path_factory) -> tuple[bytes, dict]:
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", **TINY).state_dict().items()}
    path = tmp_path_factory.mktemp("w") / "m.safetensors"
    save_file(sd, str(path))
    return path.read_bytes(), sd


def _precompute(tmp_path, *teacher):
    data = noise_shards(tmp_path / "data", 4, 4)
    out = tmp_path / "store"
    res = invoke("precompute", "--data", data, *teacher, "--out", out, "--ray", "none", "--batch-size", "4",
                 "--workers", "0", "--threads", "1", "--quiet")
    return res, out


def _hostile(good: bytes, sd: dict, tmp: Path) -> dict[str, bytes]:
    from safetensors.torch import save_file
    hdr = json.dumps({"pos_embed": {"dtype": "F32", "shape": [1, 16, 48], "data_offsets": [0, 10 ** 12]}}).encode()
    reshaped = dict(sd, pos_embed=torch.zeros(1, 5, 48))
    save_file(reshaped, str(tmp / "r.safetensors"))
    return {"truncated": good[: len(good) // 2], "empty": b"",
            "huge header length": struct.pack("<Q", 2 ** 62) + b"{}",
            "invalid JSON header": struct.pack("<Q", 10) + b"{not json!" + b"\0" * 100,
            "offsets beyond file": struct.pack("<Q", len(hdr)) + hdr + b"\0" * 64,
            "shape mismatch": (tmp / "r.safetensors").read_bytes()}


@pytest.mark.parametrize("case,cause", [("truncated", "not a readable safetensors file"),
                                        ("empty", "header too small"),
                                        ("huge header length", "header too large"),
                                        ("invalid JSON header", "invalid JSON in header"),
                                        ("offsets beyond file", "offset"),
                                        ("shape mismatch", "pos_embed (1, 5, 48) != (1, 17, 48)")])
def test_damaged_or_hostile_safetensors_is_one_line_naming_the_file(tmp_path, good_weights, case, cause):
    weights = _hostile(*good_weights, tmp_path)[case]
    d = _teacher_dir(tmp_path, "t", weights=weights)
    res, out = _precompute(tmp_path, "--teacher", d)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert str(d / "model.safetensors") in lines[0] and cause in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("config,cause", [("{oops", "is not readable JSON"), ("[1, 2]", "does not name a timm model"),
                                          (json.dumps({"model": "vit_nonexistent_xyz"}), "unknown timm model 'vit_nonexistent_xyz'"),
                                          (json.dumps({"model": "vit_tiny_patch16_224", "model_args": dict(TINY, bogus=1)}),
                                           "unexpected keyword argument 'bogus'"),
                                          (json.dumps({"model": "vit_tiny_patch16_224", "weights": "../x.safetensors"}),
                                           '"weights" must be a file name inside')])
def test_bad_teacher_config_is_one_line(tmp_path, good_weights, config, cause):
    d = _teacher_dir(tmp_path, "t", config=config, weights=good_weights[0])
    res, out = _precompute(tmp_path, "--teacher", d)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert cause in lines[0] and not out.exists()


class _Evil:
    def __reduce__(self):
        return (print, ("ran code",))


def test_a_pth_that_needs_pickle_beyond_weights_only_is_one_line(tmp_path, good_weights):
    torch.save({"model": good_weights[1], "extra": _Evil()}, tmp_path / "evil.pth")
    args = [x for k, v in TINY.items() for x in ("--model-arg", f"{k}={v}")]
    res, out = _precompute(tmp_path, "--teacher", "vit_tiny_patch16_224", *args, "--teacher-checkpoint", tmp_path / "evil.pth")
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "evil.pth: it needs pickle beyond weights_only=True (Unsupported global" in lines[0]
    assert "ran code" not in res.output and not out.exists()


@pytest.mark.parametrize("encoding,array", [("exact:fp16", "encoded array 'k'"), ("lowrank:r=8:fp16", "encoded array 'a'"),
                                            ("exact:int4", "int4 rows")])
def test_q_k_beyond_the_encodings_range_refuse_the_job_naming_key_and_layer(tmp_path, good_weights, encoding, array):
    from safetensors.torch import save_file
    sd = dict(good_weights[1])
    for i in (1, 2):  # layer 0 stays representable: the first bad layer is named
        sd[f"blocks.{i}.attn.qkv.weight"] = sd[f"blocks.{i}.attn.qkv.weight"] * 1e6
    d = tmp_path / "huge"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_args": TINY}))
    res, out = _precompute(tmp_path, "--teacher", d, "--encoding", encoding)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "sample 's0000000', teacher layer 1:" in lines[0] and array in lines[0]
    assert "--encoding exact:fp32" in lines[0]
    assert not list(out.glob("units/*/*.json"))  # no unit marked done
    ok, _ = _precompute(tmp_path / "again", "--teacher", d, "--encoding", "exact:fp32")
    assert ok.exit_code == 0, ok.output  # a representable encoding works


def test_verify_recompute_counts_a_cache_decoding_to_nan_as_mismatched(tmp_path, monkeypatch):
    """A cache that decodes to inf/NaN (what a store written before the finite check could hold)
    is mismatched: a NaN KL compares False, so a plain `>` test would have passed it."""
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.teacher.model import TeacherConfig
    from attncache.pipeline.tools.recompute import recompute_check

    from tests.reliability.relhelp import FAST, TEACHER_ARGS

    data = noise_shards(tmp_path / "d", 8, shard_size=8, seed=3)
    out = tmp_path / "s.zarr"
    fast = [*FAST[:FAST.index("--encoding")], "--encoding", "exact:fp16", "--quiet"]
    made = invoke("precompute", "--data", data, *TEACHER_ARGS, *fast, "--ray", "none", "--out", out)
    assert made.exit_code == 0, made.output
    store = CacheStore.open(str(out))
    meta = store.meta["teacher"]
    cfg = TeacherConfig(meta["name"], tuple(sorted(meta["model_args"].items())), random_init=True, seed=0)
    assert recompute_check(store, cfg, k=3)["ok"]  # the control: the untouched cache is right

    real = CacheStore.read_factors

    def poisoned(self, view, slots):
        arrays = real(self, view, slots)
        return {name: a * np.float16(np.inf) for name, a in arrays.items()}  # inf, and NaN where 0

    monkeypatch.setattr(CacheStore, "read_factors", poisoned)
    report = recompute_check(store, cfg, k=3)
    assert not report["ok"] and len(report["mismatched"]) == 3, report
    assert all(math.isnan(m["kl_cache"]) for m in report["mismatched"]), report


@pytest.mark.slow
def test_q_k_beyond_the_encoding_under_ray_local_is_the_same_one_line_not_retried(tmp_path, good_weights):
    """Under `--ray local` the refusal comes from an actor: the job stops with the worker's own line
    (not retried --max-retries times and wrapped in UnitsFailed), and no unit is marked done."""
    from safetensors.torch import save_file

    from tests.reliability.relhelp import run_cli
    sd = dict(good_weights[1])
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"] * 1e6
    d = tmp_path / "huge"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_args": TINY}))
    data = noise_shards(tmp_path / "data", 8, 4)
    out = tmp_path / "store"
    res = run_cli("precompute", "--data", data, "--teacher", d, "--encoding", "exact:fp16", "--out", out,
                  "--ray", "local", "--num-workers", "1", "--batch-size", "4", "--threads", "1", "--quiet")
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "NonFiniteFactors" in errors[0] and "teacher layer 1:" in errors[0], res.stderr
    assert "UnitsFailed" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not list(out.glob("units/*/*.json"))  # no unit marked done

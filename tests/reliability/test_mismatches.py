"""Mismatches between a student (or an eval cache) and the training cache: each refused by
`attncache train` before its first step, with a message that names both values."""
import pytest

from relhelp import FAST, TEACHER_ARGS, invoke, noise_shards

BASE = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A lowrank train cache, an exact one, and an eval cache whose normalisation differs from both."""
    root = tmp_path_factory.mktemp("mismatch")
    data = noise_shards(root / "d", 16, shard_size=16, seed=4)
    common = ["precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none"]
    for name, extra in (("lowrank", []), ("exact", ["--encoding", "exact:fp16"]),
                        ("eval_other_norm", ["--recipe", "resize|center_crop|normalize(mean=(0.2,0.2,0.2),"
                                                         "std=(0.3,0.3,0.3))"])):
        result = invoke(*common, *extra, "--out", root / f"{name}.zarr")
        assert result.exit_code == 0, result.output
    return data, root


def _train(data, cache, out, student: dict, *extra):
    args = [a for k, v in {**BASE, **student}.items() for a in ("--student-arg", f"{k}={v}")]
    return invoke("train", "--data", data, "--cache", cache, "--out", out, "--student", "vit_tiny_patch16_224", *args,
                  "--max-steps", "2", "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet", *extra)


CASES = {  # name: (student overrides, extra options, cache, message naming both values)
    "patch size": ({"patch_size": 4}, [], "lowrank", "tokens: student 65, cache (lowrank:r=8:int8, teacher "
                                                     "vit_tiny_patch16_224) 17"),
    "image size": ({"img_size": 64, "patch_size": 16}, [], "lowrank", "image size: student 64, cache"),
    "heads": ({"num_heads": 4}, [], "lowrank", "heads: student 4, cache (lowrank:r=8:int8, teacher "
                                              "vit_tiny_patch16_224) 3"),
    "depth": ({"depth": 6}, ["--layers", "0:5"], "lowrank", "layers [3, 4] are not in the cache (lowrank:r=8:int8, "
                                                           "teacher vit_tiny_patch16_224) (it has [0, 1, 2])"),
    "prefix tokens": ({"class_token": False, "global_pool": "avg"}, [], "lowrank", "prefix tokens: student 0, cache"),
    "register tokens": ({"reg_tokens": 4}, [], "lowrank", "prefix tokens: student 5, cache"),
    "copy_q on lowrank": ({}, ["--mode", "copy_q"], "lowrank", "mode copy_q needs teacher Q/K, but the cache "
                                                               "(lowrank:r=8:int8"),
    "eval normalisation": ({}, ["--eval-cache", "EVAL"], "lowrank", "'mean': [0.5, 0.5, 0.5]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mismatch_is_refused_before_the_first_step_naming_both_values(case, caches, tmp_path):
    data, root = caches
    student, extra, cache, message = CASES[case]
    extra = [str(root / "eval_other_norm.zarr") if e == "EVAL" else e for e in extra]
    result = _train(data, root / f"{cache}.zarr", tmp_path / "run", student, *extra)
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    if case == "eval normalisation":
        assert "'mean': [0.2, 0.2, 0.2]" in result.output and "StudentMismatch" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_the_same_student_trains_and_copy_q_runs_on_an_exact_store(caches, tmp_path):
    data, root = caches
    assert _train(data, root / "lowrank.zarr", tmp_path / "a", {}).exit_code == 0
    result = _train(data, root / "exact.zarr", tmp_path / "b", {}, "--mode", "copy_q")
    assert result.exit_code == 0, result.output

"""Structured options and the machine's own failures, each refused in one line (exit 1 or 2, no
traceback) that names the option, file or key, with nothing half-written left behind: no --out
folder after a refusal, a store stopped by a full disk resumes to the same bytes."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, store_files

STUDENT = ["--student", "vit_tiny_patch16_224", *[a for kv in ("img_size=32", "patch_size=8", "depth=3",
                                                               "embed_dim=48", "num_heads=3")
                                                  for a in ("--student-arg", kv)]]


def error_line(result) -> str:
    """The one `Error:` line of a refusal; fails on a traceback or a second error line."""
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (1, 2), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    data = noise_shards(tmp / "d", 16, shard_size=8)
    store = tmp / "s.zarr"
    done = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", store)
    assert done.exit_code == 0, done.output
    return tmp, data, store


def _precompute(data, out, *extra):
    return invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", out, *extra)


GRAMMAR = ("exact[:fp16|fp32|bf16|int8|int4|fp8]  or  "
           "lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8][:scale=token|row-pow2|token-pow2][:fit=subspace|eigh], RANKS = R "
           "(every layer) or R,R,... (one per cached layer; RxK repeats R K times)")
PRECOMPUTE_CASES = {  # name: (options, the exact error line)
    "int9": (["--encoding", "lowrank:r=8:int9"],
             "Error: Invalid value for '--encoding': bad encoding 'lowrank:r=8:int9': unknown part 'int9' (expected "
             f"r=RANKS or one of fp32, fp16, bf16, int8, int4, fp8; grammar: {GRAMMAR})"),
    "f16": (["--encoding", "exact:f16"],
            "Error: Invalid value for '--encoding': bad encoding 'exact:f16': exact takes one of fp32, fp16, bf16, "
            f"int8, int4, fp8 (grammar: {GRAMMAR})"),
    "lowrnak": (["--encoding", "lowrnak:r=8"],
                "Error: Invalid value for '--encoding': unknown encoding kind 'lowrnak' in 'lowrnak:r=8'; known: exact, "
                f"lowrank ({GRAMMAR})"),
    "rank above head dim": (["--encoding", "lowrank:r=128:int8"],
                            "Error: SpecError: lowrank rank r=128 exceeds the teacher's head dim d=16"),
    "zstd:x": (["--compression", "zstd:x"],
               "Error: Invalid value for '--compression': bad compression 'zstd:x': level 'x' is not an integer "
               "(expected 'zstd[:LEVEL][:shuffle|bitshuffle[:block=SIZE]]' or 'none', e.g. zstd:3)"),
    "blosc level": (["--compression", "zstd:12:shuffle"],
                    "Error: Invalid value for '--compression': bad compression 'zstd:12:shuffle': level 12 is not in "
                    "0..9 (a shuffle goes through blosc, whose levels stop at 9)"),
    "flipp": (["--recipe", "rrc|flipp|normalize"],
              "Error: Invalid value for '--recipe': unknown augmentation op 'flipp'; known: ['center_crop', 'erase', "
              "'flip', 'jitter', 'mix', 'normalize', 'randaug', 'resize', 'rrc']"),
    "recipe syntax": (["--recipe", "rrc(scale=(0.1,)|normalize"],
                      "Error: Invalid value for '--recipe': op 'rrc': arguments 'scale=(0.1,' are not name=literal "
                      "pairs, e.g. rrc(p=0.5) (SyntaxError: '(' was never closed (<unknown>, line 1))"),
    "recipe positional": (["--recipe", "rrc(0.5)|normalize"],
                          "Error: Invalid value for '--recipe': op 'rrc': arguments must be named, e.g. rrc(p=0.5)"),
    "::0": (["--layers", "::0"],
            "Error: Invalid value for '--layers': layer selection '::0': a slice step cannot be 0 (e.g. '::2' takes "
            "every other layer)"),
    "5:2": (["--layers", "5:2"],
            "Error: Invalid value for '--layers': layer selection '5:2' selects no layer (START 5 >= STOP 2); "
            "e.g. '0:-3' or '2:5'"),
    "layers x": (["--layers", "1:x"],
                 "Error: Invalid value for '--layers': layer selection '1:x': not a slice START:STOP[:STEP] of "
                 "integers (e.g. '0:-3', '::2') or a comma list (e.g. '0,3,7')"),
    "layer 7": (["--layers", "7"],
                "Error: TeacherError: layer selection '7': not a slice or list of layers that exist in a model with "
                "3 layers"),
    "heads x": (["--heads", "x"],
                "Error: Invalid value for '--heads': head selection 'x': not a comma list of head indices >= 0 "
                "(e.g. '0,2') or 'all'"),
    "heads twice": (["--heads", "1,1"], "Error: Invalid value for '--heads': head selection '1,1' names a head twice"),
    "heads 99": (["--heads", "99"],
                 "Error: TeacherError: head selection '99': heads [99] do not exist in a teacher with 3 heads (0..2)"),
    "views 0": (["--views", "0"], "Error: Invalid value for '--views': 0 is not in the range 1<=x<=1024."),
    "seed 2**70": (["--seed", str(2**70)],
                   f"Error: Invalid value for '--seed': {2**70} is not in the range 0<=x<=4294967295."),
    "lease 0": (["--lease-timeout", "0"],
                "Error: Invalid value for '--lease-timeout': 0.0 is not in the range 0<x<=604800."),
    "model arg": (["--model-arg", "foo=1"],
                  "Error: TeacherError: timm model 'vit_tiny_patch16_224' does not accept the model arguments "
                  "{'depth': 3, 'embed_dim': 48, 'foo': 1, 'img_size': 32, 'num_heads': 3, 'patch_size': 8} "
                  "(VisionTransformer.__init__() got an unexpected keyword argument 'foo'); check --model-arg (and "
                  "the model's config.json) against the model's constructor"),
}


@pytest.mark.parametrize("case", sorted(PRECOMPUTE_CASES))
def test_precompute_refuses_a_bad_setting_in_one_line_and_creates_no_store(case, fixture):
    tmp, data, _ = fixture
    options, expected = PRECOMPUTE_CASES[case]
    out = tmp / f"new-{case.replace(' ', '_')}.zarr"
    result = _precompute(data, out, *options)
    assert error_line(result) == expected
    assert not out.exists(), f"{out} left behind after a refusal: {list(out.iterdir())}"


def test_show_refuses_an_unknown_key_view_or_head_in_one_line(fixture):
    tmp, _, store = fixture
    png = tmp / "x.png"
    key = invoke("show", store, "--key", "nope", "--out", png)
    assert error_line(key) == (f"Error: Invalid value for '--key': key 'nope' is not cached in view 0 of {store}; "
                               "`attncache inspect --keys` lists the keys it holds")
    view = invoke("show", store, "--key", "s0000000", "--view", "3", "--out", png)
    assert error_line(view) == "Error: Invalid value for '--view': view 3 is not cached: the store has views 0..0"
    head = invoke("show", store, "--key", "s0000000", "--heads", "7", "--out", png)
    assert error_line(head) == ("Error: TeacherError: head selection '7': heads [7] do not exist in a teacher with 3 "
                                "heads (0..2)")
    assert not png.exists()


@pytest.mark.parametrize("command", ["verify", "inspect", "show", "precompute"])
def test_a_store_path_that_is_a_regular_file_is_refused_and_left_untouched(command, fixture):
    tmp, data, _ = fixture
    path = tmp / "not-a-store"
    path.write_bytes(b"user data")
    args = {"verify": ["verify", path], "inspect": ["inspect", path],
            "show": ["show", path, "--key", "k", "--out", tmp / "y.png"],
            "precompute": ["precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", path]}
    line = error_line(invoke(*args[command]))
    assert f"'{path}' is a file." in line and ("'STORE'" in line or "'--out'" in line), line
    assert path.read_bytes() == b"user data"


def test_train_refuses_a_student_arg_that_collides_with_its_own_options(fixture):
    tmp, data, store = fixture
    for kv, option in (("num_classes=5", "--num-classes"), ("drop_path_rate=0.1", "--drop-path")):
        out = tmp / f"run-{option[2:]}"
        result = invoke("train", "--data", data, "--cache", store, *STUDENT, "--student-arg", kv, "--out", out,
                        "--max-steps", "1", "--workers", "0", "--quiet")
        assert error_line(result) == (f"Error: Invalid value for '--student-arg': {kv} is set by the trainer: "
                                      f"use {option} instead")
        assert not out.exists()


def test_train_refused_after_its_checks_leaves_no_out_folder(fixture):
    tmp, data, store = fixture
    out = tmp / "run-heads"
    result = invoke("train", "--data", data, "--cache", store, *STUDENT, "--heads", "5", "--out", out,
                    "--max-steps", "1", "--workers", "0", "--quiet")
    assert error_line(result).startswith("Error: TeacherError: head selection '5'")
    assert not out.exists()


def test_evaluate_advice_names_its_own_option(fixture):
    tmp, data, store = fixture
    run = tmp / "run-copy"
    trained = invoke("train", "--data", data, "--cache", store, *STUDENT, "--mode", "copy", "--out", run,
                     "--max-steps", "1", "--workers", "0", "--quiet")
    assert trained.exit_code == 0, trained.output
    line = error_line(invoke("evaluate", run, "--data", data, "--workers", "0"))
    assert line == ("Error: StudentMismatch: mode copy evaluates with the teacher's attention: give an eval store "
                    "(`evaluate --cache STORE`, `train --eval-cache STORE`; precompute the eval split with "
                    "--recipe eval) or train with an online --teacher")


# ------------------------------------------------------------------ the machine: full disk, read-only store


def _fail_at(monkeypatch, point: str, nth: int, code: int, path: str, in_unit: int = 0):
    """Raise OSError(code) the nth time precompute passes a store write point (faults.py) once it
    has started its in_unit-th unit."""
    from faults import install

    hits = []
    units = []

    def fault(name, torn_file=None):
        units.extend([name] if name == "unit-start" else [])
        if name == point and len(units) >= in_unit:
            hits.append(name)
            if len(hits) == nth:
                raise OSError(code, os.strerror(code), path)

    install(fault, monkeypatch.setattr)
    return hits


def test_enospc_mid_store_is_one_line_and_the_store_resumes_byte_identical(fixture, tmp_path, monkeypatch):
    _, data, reference = fixture
    out = tmp_path / "full.zarr"
    _fail_at(monkeypatch, "array-written", 2, errno.ENOSPC, str(out / "views" / "0"), in_unit=2)
    line = error_line(_precompute(data, out))
    assert line == (f"Error: {out / 'views' / '0'}: no space left on device: free space (or choose another path) and "
                    "re-run the same command; a store resumes from its finished units (OSError ENOSPC)")
    monkeypatch.undo()
    resumed = _precompute(data, out)
    assert resumed.exit_code == 0 and "1 already done" in resumed.output, resumed.output
    assert differing(store_files(reference), store_files(out)) == []


def test_a_read_only_store_is_refused_in_one_line(fixture, tmp_path, monkeypatch):
    """As root, chmod does not stop writes: the refusal is injected where the store writes."""
    _, data, _ = fixture
    out = tmp_path / "ro.zarr"
    _fail_at(monkeypatch, "store-create", 1, errno.EROFS, str(out))
    assert error_line(_precompute(data, out)) == (f"Error: {out}: read-only file system: choose a writable path "
                                                  "(OSError EROFS)")


@pytest.fixture
def tmpfs(tmp_path):
    """A real small file system (tmpfs), where mounting is allowed (root in a container); else skip."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); the injected tests cover it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_is_one_line_naming_the_store_and_resumes(fixture, tmpfs):
    _, data, reference = fixture
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 48 * 1024))  # leave about 48 KB: the first unit fits, not both
    out = tmpfs / "s.zarr"
    line = error_line(_precompute(data, out))
    assert line.startswith(f"Error: {out}") and "no space left on device" in line and "ENOSPC" in line, line
    filler.unlink()
    resumed = _precompute(data, out)
    assert resumed.exit_code == 0, resumed.output
    assert differing(store_files(reference), store_files(out)) == []


def test_a_real_read_only_store_refuses_precompute_in_one_line_and_verify_still_reads_it(fixture, tmpfs):
    _, data, _ = fixture
    out = tmpfs / "s.zarr"
    assert _precompute(data, out).exit_code == 0
    before = store_files(out)
    remount = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot remount read-only ({remount.stderr.decode().strip()})")
    line = error_line(_precompute(data, out))
    assert "read-only file system" in line and str(out) in line, line
    checked = invoke("verify", out)
    assert checked.exit_code == 0 and "2/2 units ok" in checked.output, checked.output
    assert differing(before, store_files(out)) == []

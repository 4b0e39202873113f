"""The public command forms of DESIGN.md's CLI contract, invoked as users type them."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from attncache.cli.main import cli

TEACHER = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--model-arg", "img_size=32",
           "--model-arg", "patch_size=8", "--model-arg", "depth=2", "--model-arg", "embed_dim=48",
           "--model-arg", "num_heads=3"]


@pytest.mark.parametrize("command", [[], ["data"], ["data", "synth"], ["data", "pack"], ["precompute"], ["verify"],
                                     ["inspect"], ["show"], ["demo"], ["teacher"], ["teacher", "pretrain"],
                                     ["repro"]])
def test_every_command_has_help_that_says_what_it_does(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4
    if command and command[-1] in ("precompute", "synth", "pack", "pretrain", "repro"):
        assert "default:" in result.output


def _precompute(data, out):
    return CliRunner().invoke(cli, ["precompute", "--data", data, *TEACHER, "--out", str(out), "--views", "2",
                                    "--layers", "0:-1", "--heads", "0,2", "--encoding", "exact:fp16",
                                    "--batch-size", "32", "--workers", "0", "--threads", "1", "--ray", "none", "--quiet"])


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, synth_data):
    out = tmp_path_factory.mktemp("cli") / "c.zarr"
    result = _precompute(synth_data["val"], out)
    assert result.exit_code == 0, result.output
    assert "samples written: 256" in result.output
    return out


def test_precompute_options_reach_the_store(cli_store):
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(cli_store), "--json"]).output)
    assert info["layers"] == [0] and info["heads"] == [0, 2] and info["views"] == 2
    assert info["encoding"] == "exact:fp16" and info["compute"]["batch_size"] == 32
    assert info["units_done"] == info["units_total"] == 2
    assert info["compression"] == {"codec": "zstd", "level": 1, "shuffle": "byte", "blocksize": 1 << 20}  # exact:fp16's own
    text = CliRunner().invoke(cli, ["inspect", str(cli_store)]).output
    assert "compression: zstd:1:shuffle:block=1M\n" in text and "encoding: exact:fp16\n" in text
    assert info["bytes_on_disk"] > 0 and info["bytes_per_sample"] > 0


def test_rerunning_the_same_command_resumes_and_does_nothing_new(cli_store, synth_data):
    result = _precompute(synth_data["val"], cli_store)
    assert result.exit_code == 0, result.output
    assert "units: 0 processed, 2 already done" in result.output


def test_show_draws_the_replayed_image_and_attention(cli_store, tmp_path):
    out = tmp_path / "a.png"
    result = CliRunner().invoke(cli, ["show", str(cli_store), "--key", "val_00000003", "--view", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(cli, ["show", str(cli_store), "--key", "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "Invalid value for '--key': key 'nope' is not cached" in missing.output
    assert "Traceback" not in missing.output  # one line, not a KeyError (issue 17)


def test_show_shares_one_colour_scale_with_a_colour_bar_and_names_the_teacher_args(cli_store):
    import numpy as np

    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.tools.show import attention_maps, figure, find_key, shared_limits

    store = CacheStore.open(cli_store)
    fig = figure(store, "val_00000003", 1, [0], None, "cls")
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1
    maps_ = [im for ax in fig.axes if ax not in colorbars for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert len(maps_) == 1 + len(store.meta["heads"])  # mean of heads + each cached head
    shard, position = find_key(store, "val_00000003", 1)
    drawn = attention_maps(store, 1, shard * store.slots_per_shard + position, "cls")
    limits = shared_limits(drawn, [0], list(range(len(store.meta["heads"]))))
    assert {im.get_clim() for im in maps_} == {limits}
    assert limits == (pytest.approx(min(drawn[0].min(), drawn[0].mean(0).min())),
                      pytest.approx(max(drawn[0].max(), drawn[0].mean(0).max())))
    title = fig._suptitle.get_text()
    assert "embed_dim=48" in title and "depth=2" in title and "img_size=32" in title
    # the pure function: one scale over the chosen panels only, the mean of heads included
    maps = np.zeros((2, 2, 1, 2))
    maps[0, 0] = [[0.0, 1.0]]
    maps[0, 1] = [[0.5, 0.5]]
    maps[1, 1] = [[9.0, 9.0]]  # a layer not drawn
    assert shared_limits(maps, [0], [1]) == (0.25, 0.75)  # head 1 and the mean of heads [0.25, 0.75]


def test_inspect_keys_lists_what_show_takes(cli_store):
    import numpy as np

    from attncache.pipeline.store.cache import CacheStore

    store = CacheStore.open(cli_store)
    listed = CliRunner().invoke(cli, ["inspect", str(cli_store), "--keys", "--view", "1"])
    assert listed.exit_code == 0, listed.output
    keys = listed.output.splitlines()
    stored = store.group["views/1/key"][:]
    valid = store.group["views/1/valid"][:]
    assert keys == [str(k) for k, ok in zip(stored, valid) if ok] and len(keys) == 128
    assert len(set(keys)) == len(keys) and "val_00000003" in keys
    as_json = CliRunner().invoke(cli, ["inspect", str(cli_store), "--keys", "--json"])
    assert json.loads(as_json.output) == keys  # view 0 holds the same samples
    bad = CliRunner().invoke(cli, ["inspect", str(cli_store), "--keys", "--view", "5"])
    assert bad.exit_code == 2 and "view 5 is not cached" in bad.output


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["precompute", "--data", str(tmp_path / "none-{0..2}.tar"), *TEACHER,
                                      "--out", str(tmp_path / "x.zarr"), "--ray", "none"])
    assert result.exit_code == 1
    assert "DataError" in result.output and "none-0.tar" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1 and "missing.zarr" in result.output


def test_reserving_gpus_for_a_cpu_teacher_is_refused(synth_data, tmp_path):
    result = CliRunner().invoke(cli, ["precompute", "--data", synth_data["val"], *TEACHER, "--out",
                                      str(tmp_path / "g.zarr"), "--gpus-per-worker", "1"])
    assert result.exit_code == 2 and "--device cuda" in result.output
    assert not (tmp_path / "g.zarr").exists()


@pytest.mark.parametrize("name, default", [("precompute", "(default: 256)"), ("precompute-profile", "(default: 32)"),
                                           ("compression", "(default: 3)"),
                                           ("train", "(default: 40)"), ("students", "(default: 0,1,2)")])
def test_bench_scripts_are_commands_whose_help_names_their_defaults(name, default):
    result = subprocess.run([sys.executable, "-m", "attncache.cli.main", "bench", name, "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: attncache bench {name}" in result.stdout and default in result.stdout


DEEP = ["--teacher", "vit_tiny_patch16_224", "--random-init", *[a for kv in ("img_size=32", "patch_size=8", "depth=4",
        "embed_dim=32", "num_heads=2") for a in ("--model-arg", kv)]]


def test_default_layers_store_trains_a_default_student_and_refuses_other_layers_in_one_line(tmp_path):
    """precompute's default (0:-3) is what a default `train` student transfers; a student asking for
    layers the store does not hold is refused before any step, in one line."""
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=32, num_val=0, config=SynthConfig(image_size=32, num_classes=4),
                         shard_size=32, seed=0)
    assert "0:-3" in CliRunner().invoke(cli, ["precompute", "--help"]).output
    store = tmp_path / "c.zarr"
    made = CliRunner().invoke(cli, ["precompute", "--data", info["train"], *DEEP, "--out", str(store), "--workers", "0",
                                    "--threads", "1", "--batch-size", "16", "--ray", "none", "--quiet"])
    assert made.exit_code == 0, made.output
    assert json.loads(CliRunner().invoke(cli, ["inspect", str(store), "--json"]).output)["layers"] == [0]
    student = ["--student", "vit_tiny_patch16_224", *[x for kv in DEEP[4::2] for x in ("--student-arg", kv)]]
    train = ["train", "--data", info["train"], "--cache", str(store), "--mode", "distill", *student, "--max-steps", "1",
             "--batch-size", "16", "--workers", "0", "--num-classes", "4"]
    ok = CliRunner().invoke(cli, [*train, "--out", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(cli, [*train, "--out", str(tmp_path / "run2"), "--layers", "0:2"])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "layers [1] are not in the cache" in refused.output and "it has [0]" in refused.output
    assert len([l for l in refused.output.splitlines() if l.strip()]) == 1, refused.output


def test_bench_precompute_json_is_one_object_with_the_four_ratios_and_their_rates():
    """Issue 18: default and every-layer precompute, default encoding and exact:fp16, each against the
    bare full forward, in one run (keys and finite positive values only: no timing is asserted)."""
    import math

    result = subprocess.run([sys.executable, "-m", "attncache.cli.main", "bench", "precompute", "--json", *DEEP[:1],
                             "vit_tiny_patch16_224", *DEEP[3:], "--images", "32", "--batch-size", "16",
                             "--workers", "0", "--threads", "1", "--no-sizes"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    keys = ["bare_forward_images_per_s"] + [f"{kind}_{run}" for kind in ("ratio", "images_per_s")
                                            for run in ("default", "all_layers", "default_exact_fp16",
                                                        "all_layers_exact_fp16")]
    for key in keys:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    layers = {r["run"]: r["layers"] for r in report["throughput"]}
    assert layers["default"] == layers["default_exact_fp16"] == [0]
    assert layers["all_layers"] == layers["all_layers_exact_fp16"] == [0, 1, 2, 3]
    assert report["ratio_default"] == report["images_per_s_default"] / report["bare_forward_images_per_s"]

"""`attncache train` / `evaluate` as users start them: options reach their use, a killed run resumes
bit for bit, torchrun splits the cache across ranks, copy modes evaluate from an eval cache."""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from attncache.cli.main import cli
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.teacher.model import TeacherConfig

from conftest import TINY_TEACHER

BIN = Path(sys.executable).parent
ATTNCACHE = [sys.executable, "-m", "attncache.cli.main"]  # this interpreter's attncache, whatever is on PATH
STUDENT = ["--student", TINY_TEACHER["model"]] + [
    a for k, v in TINY_TEACHER["model_args"].items() if k != "num_classes" for a in ("--student-arg", f"{k}={v}")]


def _cache(data, teacher_dir, out, recipe, views):
    run_precompute(PrecomputeConfig(data=(data,), out=str(out), teacher=TeacherConfig(str(teacher_dir)), views=views,
                                    recipe=recipe, encoding="lowrank:r=8:int8", layers=":", batch_size=64, workers=0, threads=2,
                                    progress=False))
    return out


@pytest.fixture(scope="module")
def mix_cache(synth_data, trained_teacher_dir, tmp_path_factory):
    """The train split with mixup/cutmix the teacher saw, 2 views, every layer, lowrank int8."""
    return _cache(synth_data["train"], trained_teacher_dir, tmp_path_factory.mktemp("train") / "mix.zarr",
                  "train_mix", views=2)


@pytest.fixture(scope="module")
def eval_cache(synth_data, trained_teacher_dir, tmp_path_factory):
    return _cache(synth_data["val"], trained_teacher_dir, tmp_path_factory.mktemp("train") / "eval.zarr", "eval",
                  views=1)


def _train_args(synth_data, cache, out, *extra):
    args = ["train", "--data", synth_data["train"], "--out", str(out), "--batch-size", "64", "--workers", "0",
            "--threads", "2", "--quiet", *STUDENT]
    if cache is not None:
        args += ["--cache", str(cache)]
    return args + list(extra)


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_train_help_names_every_option_and_its_default():
    out = _run(["train", "--help"])
    for option in ("--cache", "--mode", "--layers", "--distill-weight", "--max-steps", "--epochs", "--batch-size",
                   "--lr", "--student", "--eval-cache", "--eval-data", "--layer-decay", "--model-ema-decay",
                   "--drop-path", "--smoothing", "--clip-grad", "--amp"):
        assert option in out
    assert re.search(r"\[default: 3\.0[;\]]", out) and "[default: distill]" in out


def test_layers_mode_weight_and_lr_reach_their_use(synth_data, mix_cache, tmp_path):
    _run(_train_args(synth_data, mix_cache, tmp_path / "a", "--max-steps", "2", "--log-every", "1", "--layers", "1,2",
                     "--distill-weight", "5", "--lr", "0.002", "--warmup-epochs", "0"))
    spec = json.loads((tmp_path / "a" / "student.json").read_text())
    assert spec["transfer"]["layers"] == "1,2" and spec["transfer"]["mode"] == "distill"
    rows = [m for m in _metrics(tmp_path / "a") if "loss" in m]
    assert rows[0]["lr"] == pytest.approx(0.002)
    for m in rows:
        assert m["loss"] == pytest.approx(m["ce"] + 5 * m["transfer"], rel=1e-5) and m["transfer"] > 0
    _run(_train_args(synth_data, mix_cache, tmp_path / "b", "--max-steps", "2", "--log-every", "1", "--layers", "0",
                     "--distill-weight", "5", "--lr", "0.002", "--warmup-epochs", "0"))
    other = [m for m in _metrics(tmp_path / "b") if "loss" in m]
    assert other[0]["ce"] == pytest.approx(rows[0]["ce"], rel=1e-6)  # same init, same first batch
    assert other[0]["transfer"] != pytest.approx(rows[0]["transfer"], rel=1e-3)  # other layers, other loss
    _run(_train_args(synth_data, mix_cache, tmp_path / "c", "--max-steps", "2", "--log-every", "1", "--mode", "scratch"))
    assert all(m["transfer"] is None and m["loss"] == m["ce"] for m in _metrics(tmp_path / "c") if "loss" in m)


def test_epochs_cover_every_cached_sample_once_over_the_views(synth_data, mix_cache, tmp_path):
    result = CliRunner().invoke(cli, _train_args(synth_data, mix_cache, tmp_path / "r", "--epochs", "3", "--json"))
    assert result.exit_code == 0, result.output
    assert "warmup (5.0 epochs = 40 steps) is as long as the whole run (24 steps)" in result.stderr
    out = result.stdout
    ends = [m for m in _metrics(tmp_path / "r") if "epoch_end" in m]
    assert [(m["epoch_end"], m["epoch_samples"]) for m in ends] == [(0, 512), (1, 512), (2, 512)]
    assert json.loads(out.splitlines()[-1])["samples"] == 3 * 512


def test_a_student_that_does_not_fit_the_cache_is_refused_before_the_first_step(synth_data, mix_cache, tmp_path):
    args = _train_args(synth_data, mix_cache, tmp_path / "bad", "--max-steps", "2", "--student-arg", "patch_size=4")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "tokens: student 65, cache (lowrank:r=8:int8" in result.output and "17" in result.output
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    result = CliRunner().invoke(cli, _train_args(synth_data, mix_cache, tmp_path / "bad", "--max-steps", "2",
                                                 "--mode", "copy_q"))
    assert result.exit_code == 1 and "copy_q needs teacher Q/K" in result.output


def test_mixup_options_are_refused_with_a_cache_that_fixed_its_mix(synth_data, mix_cache, tmp_path):
    result = CliRunner().invoke(cli, _train_args(synth_data, mix_cache, tmp_path / "m", "--max-steps", "1",
                                                 "--mixup", "0.8"))
    assert result.exit_code == 2 and "precompute --recipe train_mix" in result.output


def test_another_run_in_the_same_out_is_refused(synth_data, mix_cache, tmp_path):
    _run(_train_args(synth_data, mix_cache, tmp_path / "r", "--max-steps", "1"))
    result = CliRunner().invoke(cli, _train_args(synth_data, mix_cache, tmp_path / "r", "--max-steps", "1",
                                                 "--distill-weight", "1"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output  # one line naming the option
    assert "holds another run" in result.output and "--distill-weight 3.0 there, 1.0 now" in result.output


def test_online_teacher_trains_without_a_cache(synth_data, trained_teacher_dir, tmp_path):
    _run(_train_args(synth_data, None, tmp_path / "o", "--teacher", str(trained_teacher_dir), "--max-steps", "2",
                     "--log-every", "1"))
    assert all(m["transfer"] > 0 for m in _metrics(tmp_path / "o") if "loss" in m)


def test_copy_student_evaluates_from_an_eval_cache_and_is_refused_without_one(synth_data, mix_cache, eval_cache,
                                                                             tmp_path):
    _run(_train_args(synth_data, mix_cache, tmp_path / "copy", "--mode", "copy", "--max-steps", "3",
                     "--eval-cache", str(eval_cache)))
    final = [m for m in _metrics(tmp_path / "copy") if "eval" in m][-1]["eval"]
    assert final["samples"] == 128 and 0 <= final["top1"] <= final["top5"] <= 100
    report = json.loads(_run(["evaluate", str(tmp_path / "copy"), "--cache", str(eval_cache), "--workers", "0",
                              "--json"]))
    assert report["top1"] == pytest.approx(final["top1"]) and report["mode"] == "copy"
    assert sum(map(sum, report["confusion"])) == 128 and (tmp_path / "copy" / "eval.json").is_file()
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "copy"), "--data", synth_data["val"]])
    assert result.exit_code == 1 and "--eval-cache" in result.output


def test_evaluate_a_distilled_student_on_raw_shards_needs_no_teacher(synth_data, mix_cache, tmp_path):
    _run(_train_args(synth_data, mix_cache, tmp_path / "d", "--max-steps", "2"))
    report = json.loads(_run(["evaluate", str(tmp_path / "d"), "--data", synth_data["val"], "--workers", "0", "--json"]))
    assert report["samples"] == 128 and len(report["per_class_top1"]) == 4


# ---------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_a_killed_run_resumes_to_bit_identical_weights(synth_data, mix_cache, tmp_path):
    """SIGKILL mid-run (between checkpoints, with EMA, drop path, layer decay, clipping, loader
    workers and epochs crossing views), then the same command again: weights equal bit for bit."""
    options = ["--max-steps", "20", "--checkpoint-every", "3", "--model-ema-decay", "0.9", "--drop-path", "0.1",
               "--layer-decay", "0.75", "--clip-grad", "1.0", "--warmup-epochs", "1", "--workers", "2"]
    command = [*ATTNCACHE, *_train_args(synth_data, mix_cache, tmp_path / "whole", *options)]
    subprocess.run(command, check=True, env=_env(), capture_output=True, timeout=300)
    killed = [*ATTNCACHE, *_train_args(synth_data, mix_cache, tmp_path / "killed", *options)]
    proc = subprocess.Popen(killed, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = json.loads(state.read_text())
    assert 6 <= at_kill["step"] < 20 and not (tmp_path / "killed" / "model.safetensors").exists()
    subprocess.run(killed, check=True, env=_env(), capture_output=True, timeout=300)
    for name in ("model.safetensors", "model_ema.safetensors"):
        whole, resumed = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name))
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
    assert json.loads(state.read_text())["step"] == 20


@pytest.mark.slow
def test_torchrun_splits_the_cache_across_two_ranks(synth_data, mix_cache, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU, loopback): every sample once per epoch over both
    ranks, one final accuracy printed by rank 0, and `evaluate` agrees with it."""
    out = tmp_path / "ddp"
    command = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "attncache.cli.main",
               *_train_args(synth_data, mix_cache, out, "--epochs", "2", "--batch-size", "32", "--workers", "1",
                            "--threads", "1", "--eval-data", synth_data["val"])]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [line for line in result.stdout.splitlines() if line.startswith("eval: top1")]
    assert len(evals) == 1, result.stdout
    ends = [m for m in _metrics(out) if "epoch_end" in m]
    assert [(m["epoch_end"], m["epoch_samples"]) for m in ends] == [(0, 512), (1, 512)]
    assert json.loads((out / "student.json").read_text())["run"]["world_size"] == 2
    report = json.loads(_run(["evaluate", str(out), "--data", synth_data["val"], "--workers", "0", "--json"]))
    assert evals[0].split()[2] == f"{report['top1']:.2f}"


def test_a_trained_run_directory_is_a_teacher_directory(synth_data, mix_cache, eval_cache, tmp_path):
    """Any student that needs no teacher at evaluation can teach the next one: precompute loads it."""
    _run(_train_args(synth_data, mix_cache, tmp_path / "s", "--max-steps", "1", "--mode", "scratch"))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model"] == TINY_TEACHER["model"] and config["model_args"]["num_classes"] == 4
    _run(["precompute", "--data", synth_data["val"], "--out", str(tmp_path / "next.zarr"), "--teacher",
          str(tmp_path / "s"), "--views", "1", "--workers", "0", "--quiet"])
    from attncache.pipeline.store.cache import CacheStore
    store = CacheStore.open(tmp_path / "next.zarr")
    assert store.meta["teacher"]["checkpoint"]["file"] == "model.safetensors"
    assert store.meta["teacher"]["checkpoint"]["sha256"] == hashlib.sha256(
        (tmp_path / "s" / "model.safetensors").read_bytes()).hexdigest()
    _run(_train_args(synth_data, mix_cache, tmp_path / "c", "--max-steps", "1", "--mode", "copy",
                     "--eval-cache", str(eval_cache)))
    assert not (tmp_path / "c" / "config.json").exists()


def test_amp_bf16_autocasts_the_student_on_cpu(synth_data, mix_cache, tmp_path):
    losses = {}
    for amp in ("none", "bf16"):
        _run(_train_args(synth_data, mix_cache, tmp_path / amp, "--max-steps", "1", "--log-every", "1", "--amp", amp))
        losses[amp] = [m for m in _metrics(tmp_path / amp) if "loss" in m][0]
    assert losses["bf16"]["ce"] != losses["none"]["ce"]  # the forward ran in bfloat16
    assert losses["bf16"]["ce"] == pytest.approx(losses["none"]["ce"], rel=0.05)
    assert losses["bf16"]["transfer"] == pytest.approx(losses["none"]["transfer"], rel=0.05)


def test_heads_subset_distils_only_those_heads(synth_data, mix_cache, trained_teacher_dir):
    """`--heads 0,2`: the loss compares the teacher's heads 0 and 2 with the student's heads 0 and 2,
    the same tensors an online teacher gives; copy modes refuse a subset."""
    from attncache.pipeline.train.loader import epoch_loader
    from attncache.pipeline.train.session import TransferSpec, build_session, train_stream
    from attncache.pipeline.train.student import StudentConfig, StudentMismatch, attention_ce, transfer_loss

    args = tuple(sorted((k, v) for k, v in TINY_TEACHER["model_args"].items() if k != "num_classes"))
    student = StudentConfig(TINY_TEACHER["model"], args, 4, 0.0, 3)
    cached = build_session(TransferSpec(student, "distill", "0:2", str(mix_cache), heads="0,2"), "cpu")
    online = build_session(TransferSpec(student, "distill", "0:2", None, TeacherConfig(str(trained_teacher_dir)),
                                        heads="0,2"), "cpu")
    batch = next(iter(epoch_loader(train_stream(cached, (synth_data["train"],), 0, 4, 0.0, 0), 0, 8, 0)))
    t_cache, t_online = cached.signal(batch, "cpu"), online.signal(batch, "cpu")
    assert [t.shape[1] for t in t_cache] == [2, 2]
    for a, b in zip(t_cache, t_online):
        assert torch.allclose(a.softmax(-1), b.softmax(-1), atol=0.05)  # lowrank int8 vs exact
    cached.context.set_teacher(t_cache)
    cached.model(batch["image"])
    loss = transfer_loss(cached.mode.strategy, cached.context)
    manual = sum(attention_ce(t, s[:, [0, 2]]) for t, s in zip(t_cache, cached.context.records))
    assert torch.allclose(loss, manual)
    with pytest.raises(StudentMismatch, match="distill"):
        build_session(TransferSpec(student, "copy", "0:2", str(mix_cache), heads="0"), "cpu")
    with pytest.raises(Exception, match="head selection"):
        build_session(TransferSpec(student, "distill", "0:2", str(mix_cache), heads="7"), "cpu")


def test_views_option_uses_only_the_first_views_of_the_cache(synth_data, mix_cache, tmp_path):
    _run(_train_args(synth_data, mix_cache, tmp_path / "v1", "--epochs", "2", "--views", "1", "--lr", "1e-4"))
    ends = [m for m in _metrics(tmp_path / "v1") if "epoch_end" in m]
    assert len(ends) == 2
    from attncache.pipeline.train.loader import view_of
    spec = json.loads((tmp_path / "v1" / "student.json").read_text())
    assert view_of(1, 1) == 0 and spec["run"]["views"] == 1
    result = CliRunner().invoke(cli, _train_args(synth_data, mix_cache, tmp_path / "v3", "--epochs", "1",
                                                 "--views", "3"))
    assert result.exit_code != 0 and "--views 3" in result.output and "2 views" in result.output


def test_ensemble_averages_probabilities_of_runs_on_the_same_samples(synth_data, mix_cache, tmp_path):
    from attncache.pipeline.train.ensemble import ensemble_top1, predict_run

    for name, seed in (("a", "0"), ("b", "1")):
        _run(_train_args(synth_data, mix_cache, tmp_path / name, "--max-steps", "3", "--seed", seed))
    report = ensemble_top1([str(tmp_path / "a"), str(tmp_path / "b")], (synth_data["val"],), [None, None], 64, 0)
    (pa, labels), (pb, _) = (predict_run(str(tmp_path / n), (synth_data["val"],), None, 64, 0, "cpu") for n in "ab")
    keys = sorted(labels)
    manual = sum(int((pa[k] + pb[k]).argmax()) == labels[k] for k in keys) * 100.0 / len(keys)
    assert report["samples"] == 128 and report["top1"] == pytest.approx(manual)
    alone = json.loads(_run(["evaluate", str(tmp_path / "a"), "--data", synth_data["val"], "--workers", "0",
                             "--json"]))
    assert report["top1_each"][0] == pytest.approx(alone["top1"])
    out = json.loads(_run(["evaluate", str(tmp_path / "a"), "--data", synth_data["val"], "--workers", "0",
                           "--ensemble", str(tmp_path / "b"), "--json"]))
    assert out["top1"] == pytest.approx(report["top1"])

"""A run directory's files off the happy path: a state file that is garbage, edited or another run's,
a damaged or missing checkpoint, a garbage student.json, a re-run with other options, a torn
metrics line, non-finite losses. Each is one line naming the file or option (exit 1), with every
file of the run left byte for byte as it was; never a traceback, never a deleted checkpoint."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attncache.pipeline._util.atomic import read_jsonl
from relhelp import FAST, TEACHER_ARGS, invoke, noise_shards

STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
           "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    data = noise_shards(root / "d", 16, shard_size=8, seed=4)
    result = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", root / "s.zarr")
    assert result.exit_code == 0, result.output
    return data, root / "s.zarr"


def train(cache, out, *extra):
    data, store = cache
    return invoke("train", "--data", data, "--cache", store, "--out", out, *STUDENT, "--layers", "0:2",
                  "--batch-size", 8, "--workers", 0, "--threads", 1, "--quiet", "--warmup-epochs", 0,
                  "--checkpoint-every", 1, "--log-every", 1, *(extra or ("--max-steps", 3)))


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train(cache, out)
    assert result.exit_code == 0, result.output
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _checkpoint(run: Path) -> Path:
    return run / json.loads((run / "state.json").read_text())["checkpoint"]


def _set_state(folder: Path, **change):
    state = json.loads((folder / "state.json").read_text())
    state.update(change)
    (folder / "state.json").write_text(json.dumps(state))


def _flip(path: Path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


DAMAGE = {  # name: (how, what the one line says)
    "state not JSON": (lambda r: (r / "state.json").write_text("{not json"), "state.json: cannot be read as JSON"),
    "state empty": (lambda r: (r / "state.json").write_bytes(b""), "state.json: cannot be read as JSON"),
    "state binary": (lambda r: (r / "state.json").write_bytes(b"\xff\xfe\x00garbage"), "cannot be read as JSON"),
    "state a list": (lambda r: (r / "state.json").write_text("[1, 2]"), "not a JSON object"),
    "step negative": (lambda r: _set_state(r, step=-1), "field 'step' is missing or not a count"),
    "step a string": (lambda r: _set_state(r, step="3"), "field 'step' is missing or not a count"),
    "digest removed": (lambda r: _set_state(r, checkpoint_sha256=None), "field 'checkpoint_sha256'"),
    "checkpoint path escapes": (lambda r: _set_state(r, checkpoint="../../etc/passwd"),
                                "is not a checkpoint name this program writes"),
    "another run's state": (lambda r: _set_state(r, run="0123456789abcdef"), "belongs to another run"),
    "checkpoint bit flip": (lambda r: _flip(_checkpoint(r)), "its sha256 differs"),
    "checkpoint deleted": (lambda r: _checkpoint(r).unlink(), "missing, though"),
    "checkpoint truncated": (lambda r: _checkpoint(r).write_bytes(_checkpoint(r).read_bytes()[:100]),
                             "its sha256 differs"),
    "student.json garbage": (lambda r: (r / "student.json").write_text("{\"transfer\": "), "student.json: cannot be read"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_run_state_is_one_line_and_nothing_changes(damage, cache, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    how, says = DAMAGE[damage]
    how(run)
    before = files(run)
    line = one_line_error(train(cache, run))
    assert says in line, line
    assert "nothing was deleted" in line or damage == "student.json garbage", line
    assert files(run) == before  # not one byte written, nothing deleted


def test_a_state_copied_from_another_run_is_refused(cache, finished, tmp_path):
    other = tmp_path / "other"
    assert train(cache, other, "--max-steps", 3, "--seed", 1).exit_code == 0
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "state.json").write_bytes((other / "state.json").read_bytes())
    shutil.copy(_checkpoint(other), run)
    before = files(run)
    assert "belongs to another run" in one_line_error(train(cache, run))
    assert files(run) == before


def test_a_rerun_with_other_options_names_each_option_and_both_values(cache, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = files(run)
    line = one_line_error(train(cache, run, "--max-steps", 3, "--lr", 0.01, "--smoothing", 0.2))
    assert "holds another run" in line and "--lr 0.001 there, 0.01 now" in line, line
    assert "--smoothing 0.1 there, 0.2 now" in line and "--max-steps" not in line, line
    assert files(run) == before
    line = one_line_error(train(cache, run, "--max-steps", 4))
    assert "--max-steps 3 there, 4 now" in line, line


def test_rerunning_a_finished_run_is_idempotent(cache, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = files(run)
    assert train(cache, run).exit_code == 0
    after = files(run)
    assert after.keys() == before.keys() and after["model.safetensors"] == before["model.safetensors"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(read_jsonl(finished / "metrics.jsonl"))


def test_a_huge_lr_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    """lr 1e30: step 1 is finite, its update blows the weights up, step 2's loss is NaN/inf."""
    from attncache.pipeline.train.loop import train as run_train  # the pipeline entry: independent of the CLI's --lr range

    config = _config(cache, tmp_path / "run", lr=1e30)
    with pytest.raises(Exception) as caught:
        run_train(config)
    message = str(caught.value)
    assert type(caught.value).__name__ == "TrainError" and "\n" not in message
    assert message.startswith("step 2: the ") and "(non-finite)" in message, message
    assert "cross-entropy" in message or "transfer" in message
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 1 and not (tmp_path / "run" / "model.safetensors").exists()
    tensors = load_file(str(tmp_path / "run" / state["checkpoint"]))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def _config(cache, out, lr):
    from attncache.pipeline.train.optim import OptimConfig
    from attncache.pipeline.train.session import TransferSpec
    from attncache.pipeline.train.student import StudentConfig
    from attncache.pipeline.train.loop import TrainConfig

    data, store = cache
    args = (("depth", 3), ("embed_dim", 48), ("img_size", 32), ("num_heads", 3), ("patch_size", 8))
    spec = TransferSpec(StudentConfig("vit_tiny_patch16_224", args, 4), "distill", "0:2", str(store))
    return TrainConfig(data=(data,), out=str(out), spec=spec, max_steps=4, batch_size=8, workers=0, threads=1,
                       checkpoint_every=1, log_every=1, progress=False, optim=OptimConfig(lr=lr, warmup_epochs=0))


def test_non_finite_weights_are_never_committed_over_the_last_checkpoint(tmp_path):
    from attncache.pipeline.train.checkpoint import TrainError, save_checkpoint
    from attncache.pipeline.train.optim import OptimConfig, build_optimizer

    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig())
    position = {"step": 1, "epoch": 0, "step_in_epoch": 1, "samples": 8, "epoch_samples": 8}
    save_checkpoint(tmp_path, model, optimizer, None, position, "run")
    before = files(tmp_path)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainError, match=r"step 2: model.weight holds non-finite values"):
        save_checkpoint(tmp_path, model, optimizer, None, dict(position, step=2), "run")
    assert files(tmp_path) == before


def test_metrics_readers_skip_a_torn_last_line_and_name_a_damaged_one(tmp_path):
    from attncache.pipeline.tools.show import learning_curves

    run = tmp_path / "run"
    run.mkdir()
    good = [{"step": 1, "ce": 1.5}, {"step": 2, "ce": 1.2}, {"step": 2, "eval": {"top1": 40.0}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "c')
    assert read_jsonl(run / "metrics.jsonl") == good
    assert learning_curves({"distill": run}, tmp_path / "curves.png").stat().st_size > 0
    (run / "metrics.jsonl").write_text(json.dumps(good[0]) + "\n{oops\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl(run / "metrics.jsonl")

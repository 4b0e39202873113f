"""Data-parallel training as users launch it: `torchrun --rdzv-backend c10d --rdzv-endpoint HOST:PORT`
(gloo on CPU, one node, 127.0.0.1), 2 and 3 ranks whose units hold different numbers of samples.

What must hold: a step's gradient on every rank equals one process's gradient on the union of the
ranks' batches (DDP steps and the epoch-tail steps where some rank has no batch); the final top-1
is printed once, computed on every rank's part of the eval split, and equals one process's
evaluation; a run that loses a rank to SIGKILL fails, and the same command resumes it to the
weights of an uninterrupted run; every transfer mode runs through DDP with no unused parameter.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from attncache.cli.main import cli
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.teacher.model import TeacherConfig
from attncache.pipeline.train.distributed import LaunchError, World, rank_device, wrap_model
from attncache.pipeline.train.loop import step_losses
from attncache.pipeline.train.session import TransferSpec, build_session
from attncache.pipeline.train.student import MODES, StudentConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHAPE = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 4}
STUDENT = ["--student", "vit_tiny_patch16_224"] + [a for k, v in SHAPE.items() for a in ("--student-arg", f"{k}={v}")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """7 train shards of 32 (2 ranks: 128 / 96 samples; 3 ranks: 96 / 64 / 64) and 3 val shards."""
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("ddp_data"), num_train=224, num_val=96, shard_size=32, seed=3,
                         config=SynthConfig(image_size=32, num_classes=4))


@pytest.fixture(scope="module")
def cache(data, trained_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_cache") / "mix.zarr"
    run_precompute(PrecomputeConfig(data=(data["train"],), out=str(out), teacher=TeacherConfig(str(trained_teacher_dir)),
                                    views=1, recipe="train_mix", encoding="lowrank:r=8:int8", layers=":", batch_size=64, workers=0,
                                    threads=2, progress=False))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(ranks: int, port: int, *args) -> list[str]:
    """The README's multi-node command, on one node: c10d rendezvous at 127.0.0.1:PORT."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
            "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "-m", "attncache.cli.main", *args]


def _train_args(data, cache, out, *extra):
    return ["train", "--data", data["train"], "--cache", str(cache), "--out", str(out), "--workers", "0",
            "--threads", "1", "--quiet", "--warmup-epochs", "0", *STUDENT, *extra]


def _run(command, env, timeout=300):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# ---------------------------------------------------------------------------------------------- gradients


def _dumped(path: Path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def _union_gradient(run: Path, dumps: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    """The gradient one process computes on the union of the ranks' batches, at the dumped weights."""
    spec = TransferSpec.from_json(json.loads((run / "student.json").read_text())["transfer"])
    session = build_session(spec, "cpu")
    params = {k[6:]: v for k, v in dumps[0][0].items() if k.startswith("param.")}
    session.model.load_state_dict(params, strict=False)
    parts = [t for t, _ in dumps if "batch.image" in t]
    batch = {"image": torch.cat([t["batch.image"] for t in parts]), "target": torch.cat([t["batch.target"] for t in parts]),
             "label": torch.cat([t["batch.label"] for t in parts]),
             "factors": {k[14:]: torch.cat([t[k] for t in parts]) for k in parts[0] if k.startswith("batch.factors.")},
             "key": [k for _, m in dumps for k in m["keys"].split("\n") if k]}
    session.model.train()
    loss, _, _ = step_losses(session, batch, "cpu", 3.0, None)
    loss.backward()
    return {k: p.grad for k, p in session.model.named_parameters()}


def _relative(got: dict, want: dict) -> float:
    a = torch.cat([got[f"grad.{k}"].reshape(-1).double() for k in want])
    b = torch.cat([want[k].reshape(-1).double() for k in want])
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("ranks, sizes", [(2, [[80, 80], [48, 16]]), (3, [[80, 64, 64], [16, 0, 0]])])
def test_a_step_gradient_equals_one_process_on_the_union_of_the_batches(data, cache, tmp_path, ranks, sizes):
    """Batch 80: with 2 ranks the second step is uneven (48 / 16) and goes through DDP; with 3 ranks
    the first step is uneven and in the second only rank 0 has a batch (the flat all-reduce)."""
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    torch.set_num_threads(1)
    _run(_torchrun(ranks, _free_port(), *_train_args(data, cache, out, "--max-steps", "2", "--batch-size", "80")),
         _env(ATTNCACHE_DEBUG_GRADS=str(dumps)))
    for step, expected in enumerate(sizes):
        got = [_dumped(dumps / f"step{step}.rank{r}.safetensors") for r in range(ranks)]
        assert [len([k for k in m["keys"].split("\n") if k]) for _, m in got] == expected
        assert {m["via"] for _, m in got} == {"flat" if 0 in expected else "ddp"}
        keys = [k for _, m in got for k in m["keys"].split("\n") if k]
        assert len(set(keys)) == len(keys)  # disjoint batches
        want = _union_gradient(out, got)
        for rank, (tensors, _) in enumerate(got):
            assert _relative(tensors, want) <= 1e-6, (step, rank, _relative(tensors, want))


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_a_three_rank_run_reports_one_top1_equal_to_one_process(data, cache, tmp_path):
    out = tmp_path / "run"
    result = _run(_torchrun(3, _free_port(), *_train_args(data, cache, out, "--epochs", "1", "--batch-size", "32",
                                                           "--eval-data", data["val"])), _env())
    lines = result.stdout.splitlines()
    evals = [line for line in lines if line.startswith("eval: top1")]
    assert len(evals) == 1 and len([line for line in lines if line.startswith("trained ")]) == 1, result.stdout
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval" in line][-1]["eval"]
    assert final["samples_per_rank"] == [32, 32, 32]  # each rank evaluated one of the 3 val shards
    alone = CliRunner().invoke(cli, ["evaluate", str(out), "--data", data["val"], "--workers", "0", "--json"])
    assert alone.exit_code == 0, alone.output
    report = json.loads(alone.stdout)
    assert report["samples"] == final["samples"] == 96
    assert report["top1"] == final["top1"] and report["top5"] == final["top5"]
    assert report["confusion"] == final["confusion"]
    # batches differ (one process batches across the 3 shards): per-sample float32 losses differ in rounding
    assert report["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert evals[0].split()[2] == f"{report['top1']:.2f}"


# ---------------------------------------------------------------------------------------------- resume


def _rank_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (children of the agent)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.slow
def test_sigkill_of_one_rank_fails_the_job_and_the_same_command_resumes_to_the_same_weights(data, cache, tmp_path):
    """Checkpoint every 3 steps, every rank stopped before step 4 (one step past the checkpoint),
    rank 1 SIGKILLed: torchrun fails; the same command again ends bit-identical to a run never
    killed (weights and EMA), through the epoch tail where rank 1 has no batch."""
    options = ["--max-steps", "10", "--batch-size", "16", "--checkpoint-every", "3", "--model-ema-decay", "0.9"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run(_torchrun(2, _free_port(), *_train_args(data, cache, whole, *options)), _env())
    command = _torchrun(2, _free_port(), *_train_args(data, cache, killed, *options))
    agent = subprocess.Popen(command, env=_env(ATTNCACHE_DEBUG_STALL_AT="4"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    state = killed / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] == 3):
        assert agent.poll() is None, agent.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    pids = _rank_pids(agent.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    assert agent.wait(timeout=120) != 0
    assert json.loads(state.read_text())["step"] == 3 and not (killed / "model.safetensors").exists()
    _run(command, _env())
    assert json.loads(state.read_text())["step"] == 10
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(killed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---------------------------------------------------------------------------------------------- modes, devices


@pytest.fixture
def one_rank_group():
    """A gloo group of one process, so DDP can wrap a model in this process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("finetune",)])
def test_every_mode_runs_through_ddp_with_the_gradients_of_the_bare_model(mode, one_rank_group):
    """DDP without find_unused_parameters raises on the second step if a mode leaves a parameter
    out of the loss (copy modes ignore student Q or K); the teacher signals set in the context
    before each forward must reach the wrapped layers."""
    teacher = TeacherConfig("vit_tiny_patch16_224", tuple(sorted(dict(SHAPE, num_classes=4).items())),
                            random_init=True, seed=1)
    spec = TransferSpec(StudentConfig("vit_tiny_patch16_224", tuple(sorted(SHAPE.items())), 4), mode, teacher=teacher)
    bare, wrapped = build_session(spec, "cpu"), build_session(spec, "cpu")
    ddp = wrap_model(World(0, 2), wrapped.model)  # a "distributed" world over the one-process group
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "factors": {},
                 "target": torch.softmax(torch.randn(4, 4, generator=g), -1)}
        for session, through in ((bare, None), (wrapped, ddp)):
            session.model.zero_grad(set_to_none=True)
            loss, _, _ = step_losses(session, batch, "cpu", 3.0, None, through)
            loss.backward()
        for (name, a), b in zip(bare.model.named_parameters(), wrapped.model.parameters()):
            assert b.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), (mode, name)


def test_cuda_means_the_local_rank_gpu_and_one_gpu_for_many_ranks_is_refused(tmp_path):
    assert rank_device("cuda", 3, 8) == "cuda:3"
    assert rank_device("cuda:1", 0, 1) == "cuda:1" and rank_device("cpu", 2, 4) == "cpu"
    with pytest.raises(LaunchError):
        rank_device("cuda:0", 1, 2)
    assert World(device="cpu").comm_device == torch.device("cpu")
    assert World(device="cuda:2").comm_device == torch.device("cuda:2")
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    try:
        result = CliRunner().invoke(cli, ["train", "--data", "x.tar", "--num-classes", "4", "--out",
                                          str(tmp_path / "r"), "--max-steps", "1", "--device", "cuda:0", *STUDENT])
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]
    assert result.exit_code == 1 and "--device cuda:0: 2 ranks on this node" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()

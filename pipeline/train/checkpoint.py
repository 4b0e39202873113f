"""Resumable checkpoints of a training run, with one commit point.

A checkpoint is written under a new versioned name, `checkpoint-<step>-<sha256[:16]>.safetensors`
(temp file, fsync, rename), and only then is `state.json` atomically replaced by one naming that
file, its digest, the loader position and the length of `metrics.jsonl` at that instant. The
rename of `state.json` is the commit point: before it the previous checkpoint and state are
untouched and still what a re-run resumes from; after it the superseded checkpoint is deleted. A
kill at any instant therefore leaves one complete, committed checkpoint (or none yet), and a re-run
resumes from it to the same weights bit for bit (the loop's batches and random draws are pure
functions of seed and step). Files a killed writer left behind (temps, a renamed checkpoint that
was never committed, metrics lines past the commit) are cleared or cut on resume.

A state file that cannot be trusted (not JSON, missing fields, another run's, naming a missing or
damaged checkpoint) stops the run with one line and deletes nothing: the user decides.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attncache.pipeline._util.atomic import commit_temp, remove_safetensors_temps, remove_temps, temp_path, write_json
from attncache.pipeline.train.optim import WeightEma, load_optimizer_tensors, optimizer_tensors

STATE_FILE, METRICS_FILE = "state.json", "metrics.jsonl"
LEGACY_CHECKPOINT = "checkpoint.safetensors"  # runs written before versioned names
RUN_FILES = ("checkpoint", STATE_FILE, "student.json", "model.safetensors", "model_ema.safetensors", "config.json")
CHECKPOINT_NAME = re.compile(r"checkpoint-\d{8,}-[0-9a-f]{16}\.safetensors")
POSITION = ("step", "epoch", "step_in_epoch", "samples", "epoch_samples")
FORMAT = 2


class TrainError(RuntimeError):
    """The run cannot go on for a reason the user can see and fix (one line, exit 1)."""


class CheckpointError(TrainError):
    """The run directory's checkpoint state cannot be trusted; nothing was deleted."""


def _advice(out: Path) -> str:
    return (f"nothing was deleted; restore it, or move {out / STATE_FILE} and {out}/checkpoint-*.safetensors away "
            f"to start the run over from step 0, or use another --out")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_tensors(model: torch.nn.Module, optimizer, ema: WeightEma | None) -> tuple[dict, list[dict]]:
    """Weights, EMA and optimiser state as flat named tensors, and the optimiser's param groups."""
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.clone().contiguous() for k, v in ema.state.items()})
    optim_tensors, groups = optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    return tensors, groups


def check_finite_tensors(tensors: dict, step: int) -> None:
    """Never commit NaN/inf weights over the last good checkpoint."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TrainError(f"step {step}: {name} holds non-finite values (NaN/inf); training stopped and the "
                             f"last good checkpoint was kept; lower --lr or check the teacher signals")


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer, ema: WeightEma | None, position: dict,
                    run_id: str, metrics=None) -> str:
    """Write a new checkpoint, commit it by replacing `state.json`, then delete the superseded one.
    `metrics`: the open metrics log, flushed so its committed length covers every line so far."""
    out = Path(out)
    tensors, groups = checkpoint_tensors(model, optimizer, ema)
    check_finite_tensors(tensors, position["step"])
    tmp = write_checkpoint_temp(out, tensors, position["step"])
    digest = _sha256(tmp)
    name = f"checkpoint-{position['step']:08d}-{digest[:16]}.safetensors"
    commit_temp(tmp, out / name)  # renamed into place, not yet committed
    if metrics is not None:
        metrics.flush()
        os.fsync(metrics.fileno())
    metrics_bytes = os.fstat(metrics.fileno()).st_size if metrics is not None else None
    state = {**{k: int(position[k]) for k in POSITION}, "format": FORMAT, "run": run_id, "checkpoint": name,
             "checkpoint_sha256": digest, "param_groups": groups, "metrics_bytes": metrics_bytes}
    write_json(out / STATE_FILE, state)  # the commit point: the rename of state.json
    remove_superseded(out, keep=name)
    return name


def write_checkpoint_temp(out: Path, tensors: dict, step: int) -> Path:
    """The new checkpoint under its temp name (its final name holds its digest, known only after)."""
    tmp = temp_path(Path(out) / f"checkpoint-{step:08d}.safetensors")
    save_file(tensors, str(tmp))
    return tmp


def remove_superseded(out: Path, keep: str) -> None:
    """Checkpoints other than the committed one: superseded, or renamed by a writer killed before
    its commit. Only names this module writes are touched."""
    for path in Path(out).glob("checkpoint*.safetensors"):
        if path.name != keep and (CHECKPOINT_NAME.fullmatch(path.name) or path.name == LEGACY_CHECKPOINT):
            path.unlink(missing_ok=True)
    remove_temps(out, RUN_FILES)
    remove_safetensors_temps(out)


def _state_problem(state) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    for key in POSITION:
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            return f"field {key!r} is missing or not a count"
    if not isinstance(state.get("checkpoint_sha256"), str) or not isinstance(state.get("param_groups"), list):
        return "field 'checkpoint_sha256' or 'param_groups' is missing"
    name = state.get("checkpoint", LEGACY_CHECKPOINT)
    if not isinstance(name, str) or not (CHECKPOINT_NAME.fullmatch(name) or name == LEGACY_CHECKPOINT):
        return f"field 'checkpoint' ({name!r}) is not a checkpoint name this program writes"
    if not isinstance(state.get("metrics_bytes", 0), (int, type(None))):
        return "field 'metrics_bytes' is not a count"
    return None


def read_state(out: Path, run_id: str) -> dict | None:
    """The committed state of the run in `out` (None: nothing committed yet), checked against this
    run's identity and its checkpoint's digest."""
    out = Path(out)
    path = out / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc}); {_advice(out)}") from None
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{path}: {problem}, so it is not a state file written by attncache train; "
                              f"{_advice(out)}") from None
    if "run" in state and state["run"] != run_id:
        raise CheckpointError(f"{path} belongs to another run (run id {state['run']!r}, these options and "
                              f"student.json give {run_id!r}); {_advice(out)}")
    checkpoint = out / state.get("checkpoint", LEGACY_CHECKPOINT)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: missing, though {path} names it; {_advice(out)}")
    if _sha256(checkpoint) != state["checkpoint_sha256"]:
        raise CheckpointError(f"{checkpoint}: its sha256 differs from the one {path} holds: the checkpoint is "
                              f"damaged; {_advice(out)}")
    return state


def load_checkpoint(out: Path, model: torch.nn.Module, optimizer, ema: WeightEma | None, run_id: str) -> dict | None:
    """Restore the committed checkpoint into model, EMA and optimiser; its state, or None."""
    state = read_state(out, run_id)
    if state is None:
        return None
    checkpoint = Path(out) / state.get("checkpoint", LEGACY_CHECKPOINT)
    try:
        tensors = load_file(str(checkpoint))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        load_optimizer_tensors(optimizer, tensors, state["param_groups"])
    except (SafetensorError, RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{checkpoint}: does not fit this student ({first}); {_advice(Path(out))}") from None
    return state


def open_metrics(out: Path, state: dict | None):
    """The metrics log opened for appending, first cut back to its length at the commit: lines a
    killed run wrote after its last checkpoint (a torn one among them) are written again by the
    resumed steps, so none is doubled. Without a commit yet, the log starts empty."""
    path = Path(out) / METRICS_FILE
    keep = 0 if state is None else state.get("metrics_bytes")
    if keep is not None and path.is_file() and path.stat().st_size > keep:
        os.truncate(path, keep)
    return open(path, "a")


def resume_dir(path: str | Path) -> Path:
    """timm's `--resume PATH` in our terms: the run directory whose committed checkpoint PATH is
    (PATH: that checkpoint, the run's state.json, or the directory). A run resumes in its own
    directory, from its own committed state (weights, EMA, optimiser, loader position), so anything
    else (another program's checkpoint, a superseded one, a directory with nothing committed) is
    refused in one line rather than silently starting over."""
    path = Path(path)
    run = path if path.is_dir() else path.parent
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such file or directory")
    if path.is_file() and path.name != STATE_FILE and not (CHECKPOINT_NAME.fullmatch(path.name)
                                                            or path.name == LEGACY_CHECKPOINT):
        raise CheckpointError(f"--resume {path}: not a checkpoint attncache train writes (checkpoint-<step>-<digest>"
                              f".safetensors beside its state.json); to start a student from its weights use "
                              f"--initial-checkpoint")
    state_file = run / STATE_FILE
    try:
        state = json.loads(state_file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"--resume {path}: {run} holds no committed checkpoint ({STATE_FILE} is missing), "
                              "so there is nothing to resume") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file}: cannot be read as JSON ({exc}); {_advice(run)}") from None
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{state_file}: {problem}, so it is not a state file written by attncache train; "
                              f"{_advice(run)}")
    committed = state.get("checkpoint", LEGACY_CHECKPOINT)
    if path.is_file() and path.name not in (STATE_FILE, committed):
        raise CheckpointError(f"--resume {path}: not the run's committed checkpoint ({run / committed} is); "
                              "a run resumes from its last commit only")
    return run

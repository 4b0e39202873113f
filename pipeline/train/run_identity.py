"""What makes a run directory one run: `student.json` (transfer spec + run options) and its id.

A re-run into the same `--out` resumes only with the options that shaped the saved steps; any
other value would silently mix two runs' steps (the schedule, the batches, the numerics), so it is
refused, naming each option that differs with its saved and its new value.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from attncache.pipeline._util.atomic import write_json
from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.train.checkpoint import CheckpointError, TrainError

SPEC_FILE = "student.json"
RUN_KEYS = ("data", "distill_weight", "max_steps", "epochs", "batch_size", "seed", "shuffle_buffer", "interleave",
            "smoothing", "recipe", "amp", "threads", "views")

# dotted path in student.json -> the option a user gives (paths not listed: shown as they are)
OPTION_OF = {
    "run.data": "--data", "run.distill_weight": "--distill-weight", "run.max_steps": "--max-steps",
    "run.epochs": "--epochs", "run.batch_size": "--batch-size", "run.seed": "--seed", "run.interleave": "--interleave",
    "run.shuffle_buffer": "--shuffle-buffer", "run.smoothing": "--smoothing",
    "run.recipe": "--recipe (or --mixup/--cutmix/--aa/--reprob/--hflip/--scale/--color-jitter)",
    "run.amp": "--amp", "run.threads": "--threads", "run.views": "--views", "run.world_size": "WORLD_SIZE (ranks)",
    "run.optim.lr": "--lr", "run.optim.min_lr": "--min-lr", "run.optim.weight_decay": "--weight-decay",
    "run.optim.layer_decay": "--layer-decay", "run.optim.warmup_epochs": "--warmup-epochs",
    "run.optim.clip_grad": "--clip-grad", "run.optim.model_ema_decay": "--model-ema-decay",
    "run.optim.betas": "--opt-betas", "run.optim.warmup_lr": "--warmup-lr", "transfer.mode": "--mode", "transfer.layers": "--layers", "transfer.cache": "--cache",
    "transfer.heads": "--heads", "transfer.student.name": "--student", "transfer.student.model_args": "--student-arg",
    "transfer.student.num_classes": "--num-classes", "transfer.student.drop_path": "--drop-path",
    "transfer.student.seed": "--seed", "transfer.teacher": "--teacher", "transfer.teacher.name": "--teacher",
    "transfer.teacher.model_args": "--model-arg", "transfer.teacher.checkpoint": "--teacher-checkpoint",
    "transfer.student.initial_checkpoint": "--initial-checkpoint",
    "transfer.teacher.random_init": "--random-init", "transfer.teacher.seed": "--teacher-seed",
    "transfer.teacher.device": "--device",
}


# OptimConfig fields added after runs were recorded, with the value those runs used
_LATER_KEYS = {"warmup_lr": 0.0}


class RunMismatch(TrainError):
    """`--out` holds a run made with other options."""


def run_identity(cfg) -> dict:
    """The TrainConfig values that shape the saved steps (not paths of outputs, logging, device)."""
    d = {k: getattr(cfg, k) for k in RUN_KEYS}
    d["data"] = list(cfg.data)
    d["optim"] = asdict(cfg.optim)
    for key, default in _LATER_KEYS.items():  # options added later: at their default, a run keeps its old id
        if d["optim"].get(key) == default:
            del d["optim"][key]
    d["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    return json.loads(json.dumps(d))


def run_record(spec_json: dict, cfg, recipe_json, eval_recipe=None) -> dict:
    """student.json: what the run is (its id: transfer and run) and the recipes it trains and
    evaluates raw shards with (`evaluate RUN` rebuilds both from here)."""
    record = {"transfer": spec_json, "run": run_identity(cfg), "recipe": recipe_json}
    if eval_recipe is not None:
        record["eval_recipe"] = eval_recipe.to_json()
    return record


def recorded_eval_recipe(out: Path, own):
    """The eval recipe a run resumed in `out` evaluates with: the one its student.json recorded, or,
    for a run recorded before runs from a cache recorded one, None (`eval_recipe_like` of its train
    recipe, what it evaluated with then and what `evaluate RUN` uses for it); `own` for a new run
    (and for a student.json that cannot be read: `check_or_write_run` names that)."""
    path = Path(out) / SPEC_FILE
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        return own
    if not isinstance(saved, dict) or "transfer" not in saved:
        return own
    return Recipe.from_json(saved["eval_recipe"]) if "eval_recipe" in saved else None


def run_id(record: dict) -> str:
    """Short digest of what the run is; `state.json` carries it, so another run's state is refused."""
    keyed = {"transfer": record["transfer"], "run": record["run"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _flat(value, prefix: str) -> dict:
    if isinstance(value, dict) and value and not prefix.endswith("model_args"):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def differences(saved: dict, new: dict) -> list[str]:
    """'--lr 0.001 there, 0.01 now' for each differing value of transfer and run."""
    a, b = {}, {}
    for part in ("transfer", "run"):
        a.update(_flat(saved.get(part), part))
        b.update(_flat(new.get(part), part))
    out = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            option = OPTION_OF.get(path, path)
            line = f"{option} {json.dumps(a.get(path))} there, {json.dumps(b.get(path))} now"
            if line not in out:  # --seed is both the run's and the student's
                out.append(line)
    return out


def check_or_write_run(out: Path, record: dict) -> None:
    """First run: write `student.json` (atomically). Re-run: refuse unless the options match."""
    path = Path(out) / SPEC_FILE
    if not path.exists():
        write_json(path, record)
        return
    try:
        saved = json.loads(path.read_bytes())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc}); it records which run {out} holds: restore it, or use "
                              f"another --out") from None
    diffs = differences(saved, record)
    if diffs:
        raise RunMismatch(f"{out} holds another run ({'; '.join(diffs)}); re-run with its options to resume it, "
                          f"or use another --out")

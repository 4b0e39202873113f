"""`attncache repro`: the paper's study at small scale, from one cache per teacher, several seeds.

The study is a plan of steps (data, teachers, caches, student runs, ensembles), each a real
`attncache` command run as a subprocess exactly as a user would type it; the commands are recorded
in RESULTS.md beside the numbers they produced. Every step is idempotent: a finished teacher, cache
or run is not redone, so an interrupted study resumes where it stopped.

Arms, as the paper's main table and ablations (all students the same tiny ViT, same steps):
- main (MAE teacher, as the paper): scratch, fine-tune (teacher weights), attention copy, copy-Q,
  attention distillation, and the distillation + fine-tune ensemble (evaluation only);
- teachers: fine-tune, copy and distillation from a supervised teacher (trained with labels on the
  training split), the other kind of pre-training the paper compares;
- views: distillation from the first V ∈ {1, 2, 4, 8} cached views, and from the online teacher
  (a fresh augmentation every epoch: the "patient teacher");
- layers: distil the bottom k (default, the paper's all-but-last-3), the top k, or all layers;
- heads: distil 1 or 2 of the 4 heads of each layer (4 = main);
- shift: teacher pre-trained on the shifted-style pool, students trained on the default data.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attncache.pipeline._util import atomic
from attncache.pipeline.encodings.default import DEFAULT_ENCODING
from attncache.pipeline.studies.pretrain import TINY_VIT

RECIPE = "rrc(scale=(0.35,1.0))|flip|normalize"
STUDENT_ARGS = tuple(f"{k}={v}" for k, v in TINY_VIT)
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class ReproConfig:
    out: str
    scale: float = 1.0  # multiplies the training set and the pre-training pools
    seeds: tuple[int, ...] = (0, 1, 2)
    views: tuple[int, ...] = (1, 2, 4, 8)
    student_epochs: int = 8
    teacher_epochs: int = 50  # MAE epochs over the pool
    supervised_epochs: int = 30  # the supervised teacher's epochs over the training split
    batch_size: int = 128
    lr: float = 2e-3
    distill_weight: float = 3.0
    encoding: str = DEFAULT_ENCODING
    groups: tuple[str, ...] = ("main", "teachers", "views", "layers", "heads", "shift")
    device: str = "cpu"
    workers: int = 1
    jobs: int = 1  # student runs at a time (a GPU or many cores)
    threads: int | None = None

    @property
    def num_train(self) -> int:
        return int(2048 * self.scale)

    @property
    def num_pool(self) -> int:
        return int(4096 * self.scale)


@dataclass(frozen=True)
class Arm:
    """One student configuration of the study; `args` are the `attncache train` options beyond the shared ones."""

    name: str
    group: str
    mode: str
    args: tuple[str, ...] = ()
    teacher: str = "mae"  # which teacher's cache / weights
    label: str = ""


@dataclass
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def teacher(self, name: str) -> Path:
        return self.root / "teachers" / name

    def cache(self, name: str) -> Path:
        return self.root / "caches" / f"{name}.zarr"

    def run(self, arm: str, seed: int) -> Path:
        return self.root / "runs" / f"{arm}-s{seed}"


def shards(pattern_info: dict, split: str) -> str:
    return pattern_info[split]


def arms(cfg: ReproConfig, paths: Paths) -> list[Arm]:
    """The student arms of the selected groups, in the order they run (main first)."""
    c = {t: str(paths.cache(f"{t}-train")) for t in ("mae", "mae-shifted", "supervised")}
    eval_c = str(paths.cache("mae-val"))
    exact, exact_eval = str(paths.cache("mae-train-exact")), str(paths.cache("mae-val-exact"))
    teacher_dir = str(paths.teacher("mae"))
    top = max(cfg.views)
    out = [Arm("scratch", "main", "scratch", ("--recipe", RECIPE), label="scratch"),
           Arm("finetune", "main", "finetune", ("--teacher", teacher_dir, "--recipe", RECIPE), label="fine-tune"),
           Arm("copy", "main", "copy", ("--cache", c["mae"], "--eval-cache", eval_c), label="attention copy"),
           Arm("copy_q", "main", "copy_q", ("--cache", exact, "--eval-cache", exact_eval), label="copy Q"),
           Arm("distill", "main", "distill", ("--cache", c["mae"]), label=f"attention distillation (V={top})")]
    if "teachers" in cfg.groups:
        sup = str(paths.teacher("supervised"))
        out += [Arm("sup-finetune", "teachers", "finetune", ("--teacher", sup, "--recipe", RECIPE), "supervised",
                    "fine-tune the supervised teacher"),
                Arm("sup-copy", "teachers", "copy", ("--cache", c["supervised"], "--eval-cache",
                                                     str(paths.cache("supervised-val"))), "supervised",
                    "attention copy from the supervised teacher"),
                Arm("sup-distill", "teachers", "distill", ("--cache", c["supervised"]), "supervised",
                    "attention distillation from the supervised teacher")]
    if "views" in cfg.groups:
        out += [Arm(f"distill-v{v}", "views", "distill", ("--cache", c["mae"], "--views", str(v)),
                    label=f"distill, V={v} cached views") for v in cfg.views if v != top]
        out += [Arm("distill-online", "views", "distill", ("--teacher", teacher_dir, "--recipe", RECIPE),
                    label="distill, online teacher (new view every epoch)")]
    if "layers" in cfg.groups:
        out += [Arm("distill-top3", "layers", "distill", ("--cache", c["mae"], "--layers", "3:6"),
                    label="distill top 3 of 6 layers"),
                Arm("distill-all6", "layers", "distill", ("--cache", c["mae"], "--layers", "0:6"),
                    label="distill all 6 layers")]
    if "heads" in cfg.groups:
        out += [Arm("distill-h1", "heads", "distill", ("--cache", c["mae"], "--heads", "0"),
                    label="distill 1 of 4 heads"),
                Arm("distill-h2", "heads", "distill", ("--cache", c["mae"], "--heads", "0,1"),
                    label="distill 2 of 4 heads")]
    if "shift" in cfg.groups:
        out += [Arm("shift-distill", "shift", "distill", ("--cache", c["mae-shifted"]), "mae-shifted",
                    "distill from the shifted-pool teacher"),
                Arm("shift-finetune", "shift", "finetune", ("--teacher", str(paths.teacher("mae-shifted")),
                                                            "--recipe", RECIPE), "mae-shifted",
                    "fine-tune the shifted-pool teacher")]
    return out


# ---------------------------------------------------------------------------------------------- runner


@dataclass
class Log:
    """Commands run, with their wall time; the record RESULTS.md prints."""

    started: float = field(default_factory=time.perf_counter)
    commands: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def attncache(log: Log, step: str, args: list[str], quiet: bool = False) -> str:
    """Run `attncache ARGS` as a user would (a subprocess), record it, fail loudly with its stderr."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "attncache.cli.main", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.commands.append({"step": step, "command": "attncache " + shlex.join(args), "seconds": round(seconds, 1),
                         "rc": result.returncode})
    if result.returncode != 0:
        raise RuntimeError(f"{step}: `attncache {shlex.join(args)}` failed ({result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    if not quiet:
        print(f"[{log.elapsed() / 60:5.1f} min] {step} done in {seconds:.0f} s", flush=True)
    return result.stdout


def _threads(cfg: ReproConfig) -> list[str]:
    return ["--threads", str(cfg.threads)] if cfg.threads else []


def make_data(cfg: ReproConfig, paths: Paths, log: Log) -> dict:
    marker = paths.data / "synth.json"
    if not marker.is_file():
        attncache(log, "data", ["data", "synth", str(paths.data), "--num-train", str(cfg.num_train), "--num-val", "512",
                                "--num-pool", str(cfg.num_pool), "--num-shifted", str(cfg.num_pool),
                                "--shard-size", "256", "--seed", "0"])
    return json.loads(marker.read_text())


TEACHER_BATCH = 256  # RESULTS.md's teachers, made before `teacher pretrain`'s default batch became 64


def make_teacher(cfg: ReproConfig, paths: Paths, log: Log, name: str, data: str, method: str = "mae",
                 eval_data: str | None = None) -> Path:
    out = paths.teacher(name)
    epochs = cfg.teacher_epochs if method == "mae" else cfg.supervised_epochs
    if not (out / "pretrain.json").is_file():
        extra = ["--eval-data", eval_data] if eval_data else []
        attncache(log, f"teacher {name}", ["teacher", "pretrain", "--method", method, "--data", data, "--out", str(out),
                                           "--epochs", str(epochs), "--batch-size", str(TEACHER_BATCH), "--seed", "0",
                                           "--device", cfg.device, "--quiet",
                                           *extra, *_threads(cfg)])
    return out


def make_cache(cfg: ReproConfig, paths: Paths, log: Log, name: str, teacher: Path, data: str, views: int,
               recipe: str, encoding: str, layers: str | None = None) -> Path:
    out = paths.cache(name)
    args = ["precompute", "--data", data, "--out", str(out), "--teacher", str(teacher), "--views", str(views),
            "--recipe", recipe, "--encoding", encoding, "--ray", "none", "--device", cfg.device, "--workers", "1", "--quiet", *_threads(cfg)]
    if layers:
        args += ["--layers", layers]
    stored = _stored(out)
    if stored is not None and _canonical(stored["encoding"]) != _canonical(encoding):
        # a finished cache of another encoding would be trained from while the report names this one
        # (a study begun before the default changed, re-run for more seeds): refuse before any work
        hint = (f"resume the study with `attncache repro --out {cfg.out} --encoding {stored['encoding']}` (and the "
                "other options it was begun with), or give another --out" if encoding == cfg.encoding
                else "give another --out")
        raise StudyConflict(f"{out}: this study's cache {name} holds {stored['encoding']}, this run asks for "
                            f"{encoding}: {hint}")
    if stored is not None:  # its own compressor: a study begun before a default moved still resumes and
        from attncache.pipeline.store.layout import compression_spec  # grows (it decodes the same)

        args += ["--compression", compression_spec(stored["compression"])]
    if stored is None or stored["units_done"] != stored["units_total"] or stored["views"] < views:
        attncache(log, f"cache {name}", args)  # an unfinished store resumes unit by unit, fewer views grow
    return out


class StudyConflict(Exception):
    """The study directory holds work of other settings than this run's; nothing was run for it."""


def _canonical(spec: str) -> str:
    from attncache.pipeline.encodings.spec import parse_encoding

    return parse_encoding(spec).spec


def _stored(store: Path) -> dict | None:
    """`inspect` of an existing store, None where there is none or it is damaged (precompute then
    says what is wrong, or starts it)."""
    from attncache.pipeline.store.checks import inspect_store

    if not (store / "zarr.json").is_file():
        return None
    try:
        return inspect_store(str(store))
    except Exception:
        return None


def train_arm(cfg: ReproConfig, paths: Paths, log: Log, arm: Arm, seed: int, data: dict) -> dict:
    out = paths.run(arm.name, seed)
    done = out / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    args = ["train", "--data", data["train"], "--mode", arm.mode, "--student", "vit_tiny_patch16_224",
            *[x for a in STUDENT_ARGS for x in ("--student-arg", a)], "--epochs", str(cfg.student_epochs),
            "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--warmup-epochs", "1",
            "--distill-weight", str(cfg.distill_weight), "--seed", str(seed), "--workers", str(cfg.workers),
            "--device", cfg.device, "--out", str(out), "--quiet", "--json", *arm.args, *_threads(cfg)]
    if "--eval-cache" not in arm.args:
        args += ["--eval-data", data["val"]]
    summary = json.loads(attncache(log, f"train {arm.name} seed {seed}", args).splitlines()[-1])
    result = {"arm": arm.name, "group": arm.group, "seed": seed, "top1": summary["eval"]["top1"],
              "steps": summary["steps"], "seconds": summary["seconds"], "command": "attncache " + shlex.join(args)}
    atomic.write_json(done, result)
    return result


def ensemble(cfg: ReproConfig, paths: Paths, log: Log, seed: int, data: dict) -> dict:
    out = paths.root / "runs" / f"ensemble-distill+finetune-s{seed}.json"
    if out.is_file():
        return json.loads(out.read_text())
    report = json.loads(attncache(log, f"ensemble seed {seed}", [
        "evaluate", str(paths.run("distill", seed)), "--ensemble", str(paths.run("finetune", seed)), "--data",
        data["val"], "--workers", str(cfg.workers), "--json"]).splitlines()[-1])
    result = {"arm": "ensemble", "group": "main", "seed": seed, "top1": report["top1"],
              "members": report["top1_each"], "command": log.commands[-1]["command"]}
    atomic.write_json(out, result)
    return result


def run_study(cfg: ReproConfig) -> dict:
    """Run (or resume) every step; returns the results, also written to OUT/results.json."""
    paths = Paths(Path(cfg.out))
    paths.root.mkdir(parents=True, exist_ok=True)
    log = Log()
    data = make_data(cfg, paths, log)
    top = max(cfg.views)
    mae = make_teacher(cfg, paths, log, "mae", data["pool"])
    make_cache(cfg, paths, log, "mae-train", mae, data["train"], top, RECIPE, cfg.encoding, ":")
    make_cache(cfg, paths, log, "mae-val", mae, data["val"], 1, "eval", cfg.encoding, ":")
    make_cache(cfg, paths, log, "mae-train-exact", mae, data["train"], top, RECIPE, "exact:fp16", "0:3")
    make_cache(cfg, paths, log, "mae-val-exact", mae, data["val"], 1, "eval", "exact:fp16", "0:3")
    if "teachers" in cfg.groups:
        sup = make_teacher(cfg, paths, log, "supervised", data["train"], "supervised", data["val"])
        make_cache(cfg, paths, log, "supervised-train", sup, data["train"], top, RECIPE, cfg.encoding)
        make_cache(cfg, paths, log, "supervised-val", sup, data["val"], 1, "eval", cfg.encoding)
    if "shift" in cfg.groups:
        shifted = make_teacher(cfg, paths, log, "mae-shifted", data["shifted-pool"])
        make_cache(cfg, paths, log, "mae-shifted-train", shifted, data["train"], top, RECIPE, cfg.encoding)
    plan = arms(cfg, paths)
    # seed-major: a partial study already has every arm at one seed
    jobs = [(arm, seed) for seed in cfg.seeds for arm in plan]
    with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
        results = list(pool.map(lambda job: train_arm(cfg, paths, log, job[0], job[1], data), jobs))
    results += [ensemble(cfg, paths, log, seed, data) for seed in cfg.seeds]
    teachers = {name: json.loads((paths.teacher(name) / "pretrain.json").read_text())
                for name in ("mae", "supervised", "mae-shifted") if (paths.teacher(name) / "pretrain.json").is_file()}
    caches = {}
    from attncache.pipeline.store.checks import inspect_store

    for store in sorted((paths.root / "caches").glob("*.zarr")):
        info = inspect_store(str(store))
        caches[store.stem] = {"bytes_per_sample": info["bytes_per_sample"], "views": info["views"],
                              "encoding": info["encoding"]}
    report = {"config": asdict(cfg), "arms": [asdict(a) for a in plan], "results": results, "teachers": teachers,
              "caches": caches, "commands": log.commands, "seconds": round(log.elapsed(), 1)}
    atomic.write_json(paths.root / "results.json", report)
    return report

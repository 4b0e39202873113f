"""Everything a training or evaluation run resolves before its first step, and the checks that fail
before work: the student, its transferred layers and strategy, the teacher signal (cache or
online), the recipe, and the data streams.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attncache.pipeline.augment.recipe import Recipe, RecipeDefaults, parse_recipe
from attncache.pipeline.data.shards import DataError, expand_shards
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.meta import StoreError
from attncache.pipeline.teacher.model import (Teacher, TeacherConfig, TeacherError, model_recipe_defaults,
    named_recipe_defaults, resolve_heads, resolve_layers)
from attncache.pipeline.train.evaluate import check_same_normalisation, eval_recipe_like
from attncache.pipeline.train.loader import DEFAULT_INTERLEAVE, StreamConfig, cache_stream
from attncache.pipeline.train.signals import CacheSignal, NoSignal, OnlineSignal, SignalGeometry, check_fit
from attncache.pipeline.train.student import (Geometry, Mode, Signal, StudentConfig, StudentMismatch, TransferContext,
    build_student, default_layers, get_mode, install_transfer)


@dataclass(frozen=True)
class TransferSpec:
    """What a run transfers and from where; saved as `student.json` beside the weights."""

    student: StudentConfig
    mode: str
    layers: str | None = None
    cache: str | None = None
    teacher: TeacherConfig | None = None
    heads: str | None = None  # distill modes: comma list of heads to transfer (default every head)

    def to_json(self) -> dict:
        s, t = self.student, self.teacher
        student = {"name": s.name, "model_args": dict(s.model_args), "num_classes": s.num_classes,
                   "drop_path": s.drop_path, "seed": s.seed}
        if s.initial_checkpoint:  # only when given: runs recorded before the option keep their id
            student["initial_checkpoint"] = s.initial_checkpoint
        return {"student": student,
                "mode": self.mode, "layers": self.layers, "cache": self.cache, "heads": self.heads,
                "teacher": None if t is None else {"name": t.name, "model_args": dict(t.model_args),
                                                   "checkpoint": t.checkpoint, "random_init": t.random_init,
                                                   "seed": t.seed, "device": t.device}}

    @classmethod
    def from_json(cls, d: dict) -> "TransferSpec":
        s, t = d["student"], d.get("teacher")
        student = StudentConfig(s["name"], tuple(sorted(s["model_args"].items())), s["num_classes"], s["drop_path"],
                                s["seed"], s.get("initial_checkpoint"))
        teacher = None if t is None else TeacherConfig(t["name"], tuple(sorted(t["model_args"].items())),
                                                       t["checkpoint"], t["random_init"], t["seed"], t["device"])
        return cls(student, d["mode"], d["layers"], d.get("cache"), teacher, d.get("heads"))


@dataclass
class Session:
    """A student ready to run: the model, its transfer context and the teacher signal source."""

    model: torch.nn.Module
    mode: Mode
    layers: tuple[int, ...]
    context: TransferContext
    signal: object
    recipe: Recipe
    store: CacheStore | None
    teacher: Teacher | None
    eval_recipe: Recipe | None = None  # raw eval shards get it [default: eval_recipe_like(recipe)]


def open_checked(path: str, role: str) -> CacheStore:
    """Open a store to train or evaluate from, refusing one that fails the quick checks (schema,
    every unit's marker covering the metadata and every array, files present with their sizes): a
    student never starts on an unfinished, damaged or edited cache. Damaged bytes raise CacheCorrupt."""
    from attncache.pipeline.data.shards import redact
    from attncache.pipeline.train.loader import CacheCorrupt
    from attncache.pipeline.store.integrity import REPAIR_ADVICE
    from attncache.pipeline.store.checks import quick_problems

    store = CacheStore.open(path)
    problems = quick_problems(store)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        damaged = any(" checksum mismatch in " in p or ": missing views/" in p for p in problems)
        raise (CacheCorrupt if damaged else StoreError)(
            f"{role} {redact(path)} fails its quick checks ({len(problems)} problems): {shown}. "
            f"Run `attncache verify {redact(path)}` to see every damaged unit, then {REPAIR_ADVICE} "
            "to finish or repair it")
    return store


def transferred_heads(spec: str | None, mode: Mode, num_heads: int) -> tuple[int, ...] | None:
    """The heads a distill mode transfers; copy modes replace whole attention layers, so they refuse
    a subset rather than silently transferring every head."""
    if spec is None:
        return None
    heads = resolve_heads(spec, num_heads)
    if mode.strategy.signal is Signal.NONE or mode.strategy.uses_teacher_at_eval:
        raise StudentMismatch(f"--heads {spec}: mode {mode.name} transfers no attention loss per head; "
                              "a head subset applies to distill, distill_q and distill_k only")
    return None if heads == tuple(range(num_heads)) else heads


def _load_teacher(cfg: TeacherConfig | None, why: str) -> Teacher:
    if cfg is None:
        raise StudentMismatch(f"{why} needs a teacher: pass --cache STORE or --teacher NAME_OR_DIR")
    return Teacher(cfg)


def store_teacher_defaults(meta: dict) -> RecipeDefaults:
    """The pretrained config of the store's teacher, from the name and arguments its metadata
    records (no weights loaded): a student trained from the store evaluates raw --eval-data with the
    crop and interpolation its teacher's config gives, as with the teacher online and as
    `precompute --recipe eval` prepares an eval cache. The recipe's mean and std are the store's
    own (recorded explicitly). A teacher this timm cannot build falls back to timm's usual crop
    (0.875), in one line."""
    name, args = meta["teacher"]["name"], dict(meta["teacher"]["model_args"])
    try:
        return named_recipe_defaults(name, args)
    except TeacherError as exc:
        fallback = RecipeDefaults(int(meta["recipe"]["output_size"]), (0.5,) * 3, (0.5,) * 3)
        print(f"attncache: warning: the cache's teacher {name} {args} cannot be built here ({exc}); raw eval images "
              f"are resized to size / {fallback.crop_pct} (not its pretrained crop_pct)", file=sys.stderr)
        return fallback


def build_session(spec: TransferSpec, device: str, recipe_spec: str = "train", trained: Recipe | None = None,
                  trained_eval: Recipe | None = None) -> Session:
    """Build the student and its teacher signal; refuse a student that does not fit, naming both values.

    `trained` rebuilds a trained student for evaluation: no weights are loaded from the teacher,
    no training cache is opened, and a teacher is loaded only for copy modes trained online;
    `trained_eval` is the eval recipe its run recorded (runs before that record: None).
    Without a cache both recipes take the pretrained config of the teacher (else the student):
    mean, std, interpolation, and the eval crop."""
    mode = get_mode(spec.mode)
    evaluating = trained is not None
    if mode.init_from_teacher and spec.student.initial_checkpoint:
        raise StudentMismatch("--initial-checkpoint and --mode finetune both set the student's first weights: "
                              "give one (finetune starts from the --teacher's)")
    student = replace(spec.student, initial_checkpoint=None) if evaluating else spec.student  # trained weights follow
    model = build_student(student, init_from=spec.teacher if mode.init_from_teacher and not evaluating else None)
    geometry = Geometry.of(model)
    layers = resolve_layers(spec.layers or default_layers(geometry.num_layers), geometry.num_layers)
    heads = transferred_heads(spec.heads, mode, geometry.num_heads)
    store = open_checked(spec.cache, "cache") if spec.cache and not evaluating else None
    teacher = None
    if mode.strategy.signal is Signal.NONE or (evaluating and (spec.cache or not mode.strategy.uses_teacher_at_eval)):
        signal = NoSignal()
    elif store is not None:
        check_fit(geometry, SignalGeometry.of_store(store.meta), mode.strategy, layers, heads)
        missing = sorted(set(heads or ()) - set(store.meta["heads"]))
        if missing:
            raise StudentMismatch(f"heads {missing} are not in the cache (it has heads {store.meta['heads']})")
        signal = CacheSignal(store.meta, layers, mode.strategy.signal, heads)
    else:
        teacher = _load_teacher(spec.teacher, f"mode {mode.name}")
        check_fit(geometry, SignalGeometry.of_teacher(teacher), mode.strategy, layers)
        signal = OnlineSignal(teacher, layers, mode.strategy.signal, heads)
    eval_recipe = trained_eval
    if trained is not None:
        recipe = trained
    elif store is not None:
        recipe = Recipe.from_json(store.meta["recipe"]["ops"])
        if recipe.output_size != geometry.image_size:
            raise StudentMismatch(f"image size: student {geometry.image_size}, cache recipe {recipe.output_size}")
        defaults = store_teacher_defaults(store.meta)
        eval_recipe = eval_recipe_like(recipe, defaults.crop_pct, defaults.interpolation)
    else:
        defaults = teacher.recipe_defaults() if teacher is not None else model_recipe_defaults(model, spec.student.name)
        recipe = parse_recipe(recipe_spec, defaults)
        eval_recipe = eval_recipe_like(recipe, defaults.crop_pct, defaults.interpolation)
    context = install_transfer(model, layers, mode.strategy, heads)
    return Session(model.to(device), mode, layers, context, signal, recipe, store, teacher, eval_recipe)


def infer_num_classes(data: tuple[str, ...], cache: str | None) -> int:
    """From `classes.json` beside the shards (written by `data synth` / `data pack`), else the
    cache's labels; otherwise the user must say."""
    first = Path(expand_shards(list(data))[0])
    classes = first.parent / "classes.json"
    if classes.is_file():
        return len(json.loads(classes.read_text()))
    if cache:
        store = CacheStore.open(cache)
        labels = store.group["views/0/label"][:]
        if (labels >= 0).any():
            return int(labels.max()) + 1
    raise DataError(f"cannot tell the number of classes of {data[0]}: pass --num-classes")


def train_stream(session: Session, data: tuple[str, ...], seed: int, num_classes: int, smoothing: float,
                 shuffle_buffer: int, views: int | None = None, interleave: int = DEFAULT_INTERLEAVE) -> StreamConfig:
    """`views` uses only the cache's first N views (epoch e reads view e mod N): how many
    augmentations of each image a student needs is a question users ask of one cache.
    `interleave` units (and at least `shuffle_buffer` samples) are mixed in each shuffle window."""
    if interleave < 1:
        raise StudentMismatch(f"--interleave {interleave}: give at least 1 unit per shuffle window")
    store = session.store
    if views is not None and (store is None or not 1 <= views <= store.meta["views"]):
        have = "no cache" if store is None else f"a cache of {store.meta['views']} views"
        raise StudentMismatch(f"--views {views}: needs 1 <= views <= the cache's views, but the run has {have}")
    if store is not None:
        return cache_stream(store, data, num_classes, seed, views, smoothing, shuffle_buffer,
                            with_factors=session.mode.strategy.signal is not Signal.NONE, interleave=interleave)
    return StreamConfig(tuple(expand_shards(list(data))), tuple(session.recipe.to_json()), num_classes, None, seed,
                        None, smoothing, shuffle_buffer, with_factors=False, interleave=interleave)


def note_eval_override(own: Recipe | None, cached: Recipe, eval_cache: str) -> None:
    """One line when an eval cache prepares its images otherwise (crop, interpolation) than the
    run's own eval recipe from the teacher's pretrained config: the eval cache's is what is used."""
    if own is not None and own.to_json() != cached.to_json():
        print(f"attncache: note: eval cache {eval_cache} prepares images with {_crop_text(cached)}, not the "
              f"teacher's pretrained eval recipe ({_crop_text(own)}): evaluating with the eval cache's", file=sys.stderr)


def _crop_text(recipe: Recipe) -> str:
    ops = {op.name: op.kwargs for op in recipe.ops}
    if "resize" not in ops or "center_crop" not in ops:
        return recipe.describe()
    return (f"resize to {ops['resize']['size']} ({ops['resize']['interpolation']}), centre crop "
            f"{ops['center_crop']['size']}")


def eval_stream(session: Session, num_classes: int, eval_cache: str | None,
                eval_data: tuple[str, ...]) -> tuple[StreamConfig, object] | None:
    """The eval split and the teacher signal to evaluate with: an eval cache (its own recipe,
    view 0, and its factors for copy modes) or raw shards with the eval recipe."""
    strategy = session.mode.strategy
    if eval_cache:
        store = open_checked(eval_cache, "eval cache")
        recipe = Recipe.from_json(store.meta["recipe"]["ops"])
        try:
            check_same_normalisation(session.recipe, recipe, f"eval cache {eval_cache}")
        except ValueError as exc:  # a user error, refused before the first step with both values
            raise StudentMismatch(str(exc)) from None
        note_eval_override(session.eval_recipe, recipe, eval_cache)
        signal = NoSignal()
        if strategy.uses_teacher_at_eval:
            if session.store is not None and store.meta["teacher"]["weights_sha256"] != \
                    session.store.meta["teacher"]["weights_sha256"]:
                raise StoreError(f"eval cache {eval_cache} was made by another teacher than the training cache")
            check_fit(Geometry.of(session.model), SignalGeometry.of_store(store.meta), strategy, session.layers)
            signal = CacheSignal(store.meta, session.layers, strategy.signal)
        data = eval_data or tuple(s["url"] for s in store.meta["dataset"]["shards"])
        stream = cache_stream(store, data, num_classes, 0, 1, 0.0, 0, with_factors=strategy.uses_teacher_at_eval)
        return stream, signal
    if not eval_data:
        return None
    if strategy.uses_teacher_at_eval and session.teacher is None:
        raise StudentMismatch(f"mode {session.mode.name} evaluates with the teacher's attention: give an eval store "
                              "(`evaluate --cache STORE`, `train --eval-cache STORE`; precompute the eval split with "
                              "--recipe eval) or train with an online --teacher")
    recipe = session.eval_recipe or eval_recipe_like(session.recipe)
    stream = StreamConfig(tuple(expand_shards(list(eval_data))), tuple(recipe.to_json()), num_classes, None, 0, 1,
                          0.0, 0, with_factors=False)
    return stream, session.signal


def load_run(run: str, device: str) -> tuple[Session, TransferSpec, Path, Path]:
    """A trained student rebuilt from its run directory (or its model.safetensors) with its weights."""
    from safetensors.torch import load_file

    path = Path(run)
    run_dir = path if path.is_dir() else path.parent
    weights = path / "model.safetensors" if path.is_dir() else path
    saved = json.loads((run_dir / "student.json").read_text())
    spec = TransferSpec.from_json(saved["transfer"])
    recorded_eval = Recipe.from_json(saved["eval_recipe"]) if "eval_recipe" in saved else None
    session = build_session(spec, device, trained=Recipe.from_json(saved["recipe"]), trained_eval=recorded_eval)
    session.model.load_state_dict(load_file(str(weights)))
    return session, spec, run_dir, weights


def evaluate_run(run: str, data: tuple[str, ...], cache: str | None, batch_size: int, workers: int,
                 device: str) -> dict:
    """Rebuild a trained student from its run directory and evaluate it (see `attncache evaluate`)."""
    from attncache.pipeline.train.evaluate import evaluate_model
    from attncache.pipeline.train.loader import epoch_loader

    session, spec, run_dir, weights = load_run(run, device)
    stream, signal = eval_stream(session, spec.student.num_classes, cache, data)
    loader = epoch_loader(stream, 0, batch_size, workers)
    result = evaluate_model(session.model, session.mode.strategy, session.context, signal, loader, device,
                            spec.student.num_classes)
    # bad samples of the eval split: recorded and skipped (cache: at precompute; raw shards: here)
    return dict(result.to_json(), run_dir=str(run_dir), weights=str(weights), mode=spec.mode,
                skipped=len(loader.skipped), skipped_samples=loader.skipped[:100])

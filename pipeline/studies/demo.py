"""`attncache demo`: the whole job on the embedded data, on a laptop, in minutes.

synthetic data → pre-train a tiny teacher → precompute its attention (train views + eval split)
→ verify → train a student with attention distillation from the cache, and one from scratch with
the same steps → evaluate both → a table, a figure of attention maps (teacher vs distilled student
vs scratch student, as the paper's figure) and a figure of the learning curves.

The teacher is pre-trained with labels (supervised) by default: at this scale an MAE teacher's
attention does not transfer (RESULTS.md measures both), and a demo should show the tool doing what
it is for. `--teacher-method mae` runs the paper's main teacher instead.

Everything runs in this process through the same library calls the CLI commands make; each step
prints the equivalent command so a user can take it from there.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attncache.pipeline._util import atomic
from attncache.pipeline.studies.pretrain import TINY_VIT

RECIPE = "rrc(scale=(0.35,1.0))|flip|normalize"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    num_train: int = 2048
    num_val: int = 512
    num_pool: int = 2048
    teacher_method: str = "supervised"  # or "mae" (on the unlabelled pool)
    teacher_epochs: int = 30
    student_epochs: int = 6
    views: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    workers: int = 1
    progress: bool = True


QUICK = DemoConfig(num_train=256, num_val=128, num_pool=256, teacher_epochs=2, student_epochs=2, views=1,
                   batch_size=64)


@dataclass
class Step:
    started: float

    def done(self, what: str) -> str:
        return f"[{time.perf_counter() - self.started:6.1f} s] {what}"


TEACHER_EVAL_EVERY = 5  # the teacher's val top-1 every 5 epochs (pretrain.json) and after the last: ~1 s each
TEACHER_BATCH = 256  # the demo's teacher as before `teacher pretrain`'s default became 64: the same weights and time


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Run every step; returns the summary also written to OUT/demo.json."""
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute
    from attncache.pipeline.studies.pretrain import METHODS, PretrainConfig, pretrain
    from attncache.pipeline.train.session import TransferSpec, infer_num_classes
    from attncache.pipeline.train.student import StudentConfig
    from attncache.pipeline.studies.synth import synth_dataset
    from attncache.pipeline.teacher.model import TeacherConfig
    from attncache.pipeline.train.loop import TrainConfig, train
    from attncache.pipeline.train.optim import OptimConfig
    from attncache.pipeline.tools.show import learning_curves
    from attncache.pipeline.store.checks import inspect_store, verify_store

    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    step = Step(time.perf_counter())
    info = synth_dataset(out / "data", cfg.num_train, cfg.num_val, shard_size=256, seed=0, num_pool=cfg.num_pool)
    echo(step.done(f"data: {cfg.num_train} train, {cfg.num_val} val, {cfg.num_pool} unlabelled pool images "
                   f"({', '.join(info['classes'])})\n    attncache data synth {out / 'data'} --num-train {cfg.num_train} "
                   f"--num-val {cfg.num_val} --num-pool {cfg.num_pool}"))
    teacher_dir = out / "teacher"
    method = METHODS[cfg.teacher_method]
    source = info["train"] if method.labelled else info["pool"]
    result = pretrain(PretrainConfig(data=(source,), out=str(teacher_dir), method=method, epochs=cfg.teacher_epochs,
                                     eval_data=(info["val"],) if method.labelled else (), eval_every=TEACHER_EVAL_EVERY,
                                     batch_size=TEACHER_BATCH, progress=cfg.progress))
    accuracy = f", val top-1 {result.eval_top1:.2f}" if result.eval_top1 is not None else ""
    echo(step.done(f"teacher: {method.name}, {result.steps} steps on {result.images} images, final loss "
                   f"{result.final_loss:.3f}{accuracy}\n    attncache teacher pretrain --method {method.name} --data "
                   f"'{source}' --out {teacher_dir} --epochs {cfg.teacher_epochs} --batch-size {TEACHER_BATCH}"))
    teacher = TeacherConfig(str(teacher_dir))
    cache, eval_cache = out / "cache.zarr", out / "eval.zarr"
    for store, data, views, recipe in ((cache, info["train"], cfg.views, RECIPE), (eval_cache, info["val"], 1, "eval")):
        summary = run_precompute(PrecomputeConfig(data=(data,), out=str(store), teacher=teacher, views=views,
                                                  recipe=recipe, workers=cfg.workers, progress=cfg.progress))
        report = verify_store(str(store))
        if not report.ok:
            raise RuntimeError(f"verify {store}: {report.problems}")
        stats = inspect_store(str(store))
        echo(step.done(f"cache {store.name}: {summary.lines()[0] if summary.lines() else ''}; verify "
                       f"{report.units_ok}/{report.units_total} units ok; {stats['bytes_per_sample']:,.0f} bytes per "
                       f"sample-view ({stats['ratio_to_raw_fp32_maps']:.1f}x under fp32 maps)\n"
                       f"    attncache precompute --data '{data}' --out {store} --teacher {teacher_dir} --views {views} "
                       f"--recipe '{recipe}' --ray none"))
    classes = infer_num_classes((info["train"],), None)
    runs = {}
    for mode in ("distill", "scratch"):
        spec = TransferSpec(StudentConfig("vit_tiny_patch16_224", TINY_VIT, classes, 0.0, 0), mode,
                            cache=str(cache) if mode == "distill" else None)
        run_dir = out / f"student-{mode}"
        trained = train(TrainConfig(data=(info["train"],), out=str(run_dir), spec=spec, epochs=cfg.student_epochs,
                                    batch_size=cfg.batch_size, workers=cfg.workers, recipe=RECIPE,
                                    eval_data=(info["val"],), eval_every=1, progress=cfg.progress,
                                    optim=OptimConfig(lr=cfg.lr, warmup_epochs=1.0)))
        runs[mode] = {"top1": trained.final["top1"], "top5": trained.final["top5"], "steps": trained.steps,
                      "seconds": round(trained.seconds, 1), "run": str(run_dir)}
        source = f"--cache {cache}" if mode == "distill" else f"--recipe '{RECIPE}'"
        echo(step.done(f"student {mode}: {trained.steps} steps, val top-1 {trained.final['top1']:.2f}\n"
                       f"    attncache train --data '{info['train']}' --mode {mode} {source} --student "
                       f"vit_tiny_patch16_224 {' '.join(f'--student-arg {k}={v}' for k, v in TINY_VIT)} --epochs "
                       f"{cfg.student_epochs} --batch-size {cfg.batch_size} --lr {cfg.lr} --warmup-epochs 1 "
                       f"--eval-data '{info['val']}' --eval-every 1 --out {run_dir}"))
    figures = {"attention": str(attention_figure(eval_cache, teacher_dir, {m: Path(r["run"]) for m, r in runs.items()},
                                                 out / "attention.png")),
               "curves": str(learning_curves({m: Path(r["run"]) for m, r in runs.items()}, out / "learning_curves.png"))}
    summary = {"config": {k: v for k, v in cfg.__dict__.items()}, "runs": runs, "figures": figures,
               "teacher": {"method": method.name, "eval_top1": result.eval_top1, "steps": result.steps},
               "seconds": round(time.perf_counter() - step.started, 1)}
    atomic.write_json(out / "demo.json", summary)
    return summary


def table(summary: dict) -> str:
    rows = ["| student (same steps) | val top-1 | val top-5 | steps | seconds |", "|---|---:|---:|---:|---:|"]
    for mode, label in (("scratch", "from scratch"), ("distill", "attention distillation from the cache")):
        r = summary["runs"][mode]
        rows.append(f"| {label} | {r['top1']:.2f} | {r['top5']:.2f} | {r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- figures


def _probs_of(model, pixels_CHW: torch.Tensor, layer: int) -> np.ndarray:
    """[H, N, N] attention of one layer of a loaded model directory (pipeline.teacher.model.Teacher)."""
    from attncache.pipeline.encodings.kl import exact_logits

    q, k = model.capture(pixels_CHW[None], (layer,))
    return exact_logits(q, k, model.scale)[0, 0].softmax(-1).numpy()


def attention_figure(eval_cache: Path, teacher_dir: Path, runs: dict[str, Path], out: Path, images: int = 4) -> Path:
    """Rows: val images; columns: image, teacher, distilled student, scratch student (class-token
    attention over patches, mean of heads, at the last transferred layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attncache.pipeline.augment.recipe import Recipe
    from attncache.pipeline.data.shards import decode_sample, iter_shard
    from attncache.pipeline.tools.show import replayed_image
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.train.student import default_layers
    from attncache.pipeline.teacher.model import resolve_layers

    store = CacheStore.open(str(eval_cache))
    recipe = Recipe.from_json(store.meta["recipe"]["ops"])
    depth = store.meta["teacher"]["num_layers"]  # student layer l transfers teacher layer l
    layers = resolve_layers(default_layers(depth), depth)
    layer = layers[-1]
    prefix = store.meta["tokens"]["num_prefix_tokens"]
    gh, gw = store.meta["tokens"]["grid"]
    url = store.meta["dataset"]["shards"][0]["url"]
    entries = [e for _, e in zip(range(images), iter_shard(url))]
    from attncache.pipeline.teacher.model import Teacher, TeacherConfig

    # a teacher dir, and run dirs of modes that need no teacher at eval (they hold config.json), load alike
    columns = [(title, Teacher(TeacherConfig(str(source)))) for title, source in
               (("teacher", teacher_dir), ("distilled student", runs["distill"]), ("scratch student", runs["scratch"]))]
    fig, axes = plt.subplots(len(entries), 1 + len(columns), figsize=(2.1 * (1 + len(columns)), 2.1 * len(entries)),
                             squeeze=False)
    for r, entry in enumerate(entries):
        aug = store.group["views/0/aug"][entry.position]
        axes[r, 0].imshow(replayed_image(store, 0, entry.position, aug))
        image, label = decode_sample(url, entry)
        pixels = recipe.apply(aug[: recipe.num_params], image)
        for c, (title, source) in enumerate(columns, start=1):
            probs = _probs_of(source, pixels, layer)
            axes[r, c].imshow(probs[:, 0, prefix:].mean(0).reshape(gh, gw), cmap="inferno")
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(entry.key, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"class-token attention, layer {layer}, mean of heads", fontsize=9)
    fig.tight_layout()
    atomic.save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out

"""The defaults and choices the commands' `--help` shows, without importing the pipeline (issue 16 item 6).

Why a copy: the pipeline's config dataclasses live beside the code that runs them (torch, timm,
Zarr, Ray), so reading a default from them costs seconds of imports before `--help` can answer.
These stdlib-only mirrors let the click group and every help page build without any of that; each
command imports the pipeline in its body, when it runs. Each class below mirrors the fields of the
pipeline config named in its docstring, field by field with the same names, and
tests/test_cli_help.py checks that every value equals the pipeline's own default, so the two cannot
drift apart silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from attncache.pipeline._util.runtime import default_threads
from attncache.pipeline.encodings.default import COMPRESSION_HELP, DEFAULT_ENCODING  # imports nothing


@dataclass(frozen=True)
class Precompute:
    """pipeline.precompute.job.PrecomputeConfig."""
    views: int = 1
    recipe: str = "train"
    layers: str | None = None
    encoding: str = DEFAULT_ENCODING
    compression: str | None = None  # the encoding's own: COMPRESSION_HELP
    batch_size: int = 64
    workers: int = 2
    threads: int = field(default_factory=default_threads)
    on_bad_sample: str = "skip"  # OnBadSample.SKIP.value
    lease_timeout: float = 120.0
    max_sample_bytes: int = 64 << 20


ON_BAD_SAMPLE = ("fail", "skip")  # pipeline.precompute.job.OnBadSample values, in order
MAX_SAMPLE_BYTES_RANGE = (1024, 1 << 40)  # pipeline.data.shards.MAX_SAMPLE_BYTES_RANGE


@dataclass(frozen=True)
class Fidelity:
    """pipeline.tools.fidelity.FidelityConfig."""
    samples: int = 32
    batch_size: int = 8
    threads: int = field(default_factory=default_threads)


# pipeline.tools.fidelity.DEFAULT_GRID
FIDELITY_GRID = ("exact:fp16", "exact:fp8", "exact:int8", "exact:int4", "lowrank:r=32:fp16", "lowrank:r=32:int8",
                 "lowrank:r=16:fp16", "lowrank:r=16:int8", "lowrank:r=8:fp16", "lowrank:r=8:int8", "lowrank:r=4:fp16",
                 "lowrank:r=4:int8", "lowrank:r=16:fp8", "lowrank:r=16:int4", "lowrank:r=8:fp8", "lowrank:r=8:int4",
                 "lowrank:r=2:int4")


@dataclass(frozen=True)
class Synth:
    """pipeline.studies.synth.SynthConfig."""
    image_size: int = 32
    num_classes: int = 6
    decoys: int = 2
    blobs: int = 3
    scale: tuple[float, float] = (0.16, 0.3)
    texture: bool = True
    noise: float = 12.0


@dataclass(frozen=True)
class Demo:
    """pipeline.studies.demo.DemoConfig (the defaults)."""
    out: str = "demo_out"
    teacher_method: str = "supervised"


@dataclass(frozen=True)
class DemoQuick:
    """pipeline.studies.demo.QUICK (`demo --quick`)."""
    num_train: int = 256
    teacher_epochs: int = 2
    student_epochs: int = 2


@dataclass(frozen=True)
class Plan:
    """pipeline.tools.plan.PlanConfig."""
    views: int = 1
    layers: str | None = None
    encoding: str = DEFAULT_ENCODING
    compression: str | None = None  # the encoding's own: COMPRESSION_HELP
    compression_factor: str = "none"
    recipe: str = "train"
    key_bytes: int = 16
    batch_size: int = 8
    measure_batches: int = 2
    threads: int = field(default_factory=default_threads)


PLAN_MODES = ("copy", "distill", "copy_q", "copy_k", "distill_q", "distill_k")  # pipeline.tools.plan.TRANSFER_MODES


@dataclass(frozen=True)
class Repro:
    """pipeline.studies.repro.ReproConfig."""
    scale: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    views: tuple[int, ...] = (1, 2, 4, 8)
    student_epochs: int = 8
    teacher_epochs: int = 50
    supervised_epochs: int = 30
    jobs: int = 1
    batch_size: int = 128
    lr: float = 2e-3
    encoding: str = DEFAULT_ENCODING
    device: str = "cpu"


@dataclass(frozen=True)
class Pretrain:
    """pipeline.studies.pretrain.PretrainConfig (optim: its OptimConfig), Mae and Supervised."""
    model: str = "vit_tiny_patch16_224"
    epochs: int = 40
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    lr: float = 1.5e-3  # .optim.lr
    warmup_epochs: float = 4.0  # .optim.warmup_epochs
    weight_decay: float = 0.05  # .optim.weight_decay
    mask_ratio: float = 0.75  # Mae()
    decoder_dim: int = 64  # Mae()
    decoder_depth: int = 2  # Mae()
    smoothing: float = 0.1  # Supervised()
    holdout: float = 0.0
    eval_every: int = 1


PRETRAIN_METHODS = ("mae", "supervised")  # sorted(pipeline.studies.pretrain.METHODS)
# pipeline.studies.pretrain.TINY_VIT
TINY_VIT = (("depth", 6), ("embed_dim", 64), ("img_size", 32), ("num_heads", 4), ("patch_size", 4))


@dataclass(frozen=True)
class Train:
    """pipeline.train.loop.TrainConfig."""
    batch_size: int = 64
    distill_weight: float = 3.0
    smoothing: float = 0.1
    recipe: str = "train"
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 256
    interleave: int = 16
    checkpoint_every: int = 200
    log_every: int = 10
    max_sample_bytes: int = 64 << 20


@dataclass(frozen=True)
class Optim:
    """pipeline.train.optim.OptimConfig."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    warmup_lr: float = 0.0


# pipeline.train.student.MODES, in order
TRAIN_MODES = ("scratch", "finetune", "copy", "copy_q", "copy_k", "distill", "distill_q", "distill_k")


# ------------------------------------------------------------------------ the recipe grammar (issue 16 item 3)

# pipeline.augment.ops.OPS: every op, in order, its arguments and their defaults (None: from the teacher's
# pretrained config, TEACHER below) and what it does. tests/test_train_config.py checks names, arguments
# and defaults against the op table itself, which imports torch and PIL.
RECIPE_OPS = (
    ("rrc", {"size": None, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": None},
     "random resized crop to size x size (torchvision RandomResizedCrop)"),
    ("flip", {"p": 0.5}, "horizontal flip with probability p"),
    ("jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0}, "colour jitter"),
    ("randaug", {"n": 2, "m": 9.0, "mstd": 0.5, "p": 0.5, "inc": 1, "mmax": 10.0, "mean": None, "interpolation": None},
     "timm RandAugment (rand-m9-mstd0.5-inc1): n ops, each with probability p, magnitude m (std mstd, at "
     "most mmax); inc=1: timm's increasing-magnitude ops; mean: the fill colour"),
    ("resize", {"size": None, "interpolation": None}, "shorter side to size (default: image size / crop_pct)"),
    ("center_crop", {"size": None}, "centre crop to size x size"),
    ("normalize", {"mean": None, "std": None}, "to a tensor, (x - mean) / std; exactly one, between the PIL "
                                               "ops and the tensor ops"),
    ("erase", {"p": 0.25, "scale": (0.02, 1 / 3), "ratio": (0.3, 3.3)},
     "timm RandomErasing (mode='pixel'), with probability p; after normalize"),
    ("mix", {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5},
     "timm Mixup/CutMix with a partner from the same unit; the last op, if any"),
)
TEACHER = "teacher"  # how a None default is shown: the teacher's image size, mean, std, interpolation


def _literal(value) -> str:
    if value is None:
        return TEACHER
    if isinstance(value, tuple):
        return "(" + ",".join(_literal(v) for v in value) + ")"
    return repr(round(value, 4)) if isinstance(value, float) else repr(value)


def recipe_grammar() -> str:
    """The recipe grammar as a help epilog: presets, then each op with its arguments and defaults."""
    import textwrap

    lines = ["Recipes (--recipe): a preset, or ops joined by '|', each `op` or `op(arg=value,...)`; missing "
             f"arguments take the defaults below ('{TEACHER}': from the teacher's pretrained config).",
             "", "\b", "Presets:"]
    for name, text in RECIPE_PRESETS:
        lines += textwrap.wrap(f"{name}: " + text.replace("|", " | "), 76, initial_indent="  ",
                               subsequent_indent="      ", break_on_hyphens=False)
    lines += ["", "\b", "Ops (arguments and defaults):"]
    for name, args, what in RECIPE_OPS:
        signature = f"{name}(" + ", ".join(f"{k}={_literal(v)}" for k, v in args.items()) + ")"
        lines += textwrap.wrap(signature, 76, initial_indent="  ", subsequent_indent="      ")
        lines += textwrap.wrap(what, 76, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


# pipeline.augment.spec.PRESETS, in order
RECIPE_PRESETS = (("train", "rrc(scale=(0.08,1.0))|flip|randaug(n=2,m=9,mstd=0.5,inc=1)|normalize|erase(p=0.25)"),
                  ("eval", "resize|center_crop|normalize"),
                  ("train_mix", "rrc(scale=(0.08,1.0))|flip|randaug(n=2,m=9,mstd=0.5,inc=1)|normalize|erase(p=0.25)|mix"))

"""Planning a store before running it: bytes per array, total size, and precompute time.

Only shapes matter, so the teacher is built with random weights (`pretrained=False`, no downloads);
a teacher directory gives its model and arguments but its weights are not read. Sizes come from
the encoding's array specs plus the base arrays (key, label, valid, aug). Compression is not
predicted: float bits are close to random, so the uncompressed size is the plan unless a factor is
given (`--compression-factor 1.1`) or measured on random inputs (`measured`: random weights and
pixels compress differently from real ones, so treat it as a rough guide). Time comes from a given
images/s, or from a short measured run of teacher forward + Q/K capture + encoding on random
inputs here; decoding, augmentation and writing are not in it (BENCHMARKS.md: on 2 CPU cores a
whole precompute ran at 0.55-1.04 of the bare full forward on 2026-12-03, by encoding, layers and
machine).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import timm
import torch

from attncache.pipeline._util.runtime import default_threads
from attncache.pipeline.augment.recipe import parse_recipe
from attncache.pipeline.encodings.exact import QK_ENCODINGS
from attncache.pipeline.encodings.spec import DEFAULT_ENCODING, parse_encoding
from attncache.pipeline.store.layout import FACTOR_CHUNK_SLOTS, base_arrays, parse_compression
from attncache.pipeline.teacher.model import (DEFAULT_LAYERS_TEXT, Teacher, TeacherConfig, resolve_heads,
    resolve_layers_or_default, resolve_teacher_config)

# transfer mode -> the teacher tensor it consumes (as `student.MODES[mode].strategy.signal`)
TRANSFER_MODES = {"copy": "logits", "distill": "logits", "copy_q": "q", "copy_k": "k", "distill_q": "q",
                  "distill_k": "k"}
KEY_LENGTH_PREFIX = 4  # vlen-utf8 stores a 4-byte length before every string
SHARD_INDEX_BYTES = 16  # per inner chunk (offset, length as uint64)


class PlanError(ValueError):
    """The plan asks for something the store could not do (mode vs encoding, rank vs head dim)."""


@dataclass(frozen=True)
class PlanConfig:
    teacher: TeacherConfig
    samples: int
    views: int = 1
    layers: str | None = None  # None: precompute's default, the layers a default student transfers (`0:-3`)
    heads: str | None = None
    encoding: str = DEFAULT_ENCODING
    compression: str | None = None  # None: the encoding's own, as precompute's
    compression_factor: str = "none"  # none | a number | measured
    recipe: str = "train"
    key_bytes: int = 16
    mode: str | None = None
    images_per_s: float | None = None
    batch_size: int = 8
    measure_batches: int = 2
    threads: int = field(default_factory=default_threads)


def check_mode(encoding, mode: str | None) -> None:
    """Refuse an encoding that cannot serve the transfer mode, by the encoding's own `decodes` (what
    the trainer's fit check and decoder use too): *_q / *_k modes need Q and K themselves."""
    if mode is None:
        return
    if mode not in TRANSFER_MODES:
        raise PlanError(f"unknown transfer mode {mode!r}; known: {', '.join(TRANSFER_MODES)}")
    if TRANSFER_MODES[mode] not in encoding.decodes:
        raise PlanError(f"encoding {encoding.spec} {encoding.refusal}, so it cannot serve mode {mode}; use an exact "
                        f"encoding ({QK_ENCODINGS}) or a logit mode (copy, distill)")


def shape_teacher(cfg: TeacherConfig) -> Teacher:
    """The teacher's architecture with seeded random weights: what planning needs, without weights."""
    cfg = resolve_teacher_config(cfg)
    if not timm.is_model(cfg.name):
        raise PlanError(f"unknown timm model {cfg.name!r} (and no teacher directory of that name)")
    try:
        return Teacher(replace(cfg, checkpoint=None, random_init=True))
    except TypeError as exc:  # a --model-arg the model does not take
        raise PlanError(f"{cfg.name} with model arguments {dict(cfg.model_args)}: {exc}") from exc


def parse_factor(text: str) -> float | str | None:
    text = str(text).strip().lower()
    if text in ("none", "", "1"):
        return None
    if text == "measured":
        return "measured"
    try:
        value = float(text)
    except ValueError:
        raise PlanError(f"--compression-factor {text!r}: expected none, measured, or a number > 0") from None
    if value <= 0:
        raise PlanError(f"--compression-factor {text!r}: must be > 0")
    return value


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _random_images(teacher: Teacher, batch_size: int, seed: int) -> torch.Tensor:
    size = teacher.recipe_defaults().image_size
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def measure_images_per_s(teacher: Teacher, encoding, layers, heads, config: PlanConfig) -> float:
    """Teacher forward + Q/K capture + encoding on random inputs: one warm-up batch, then timed batches."""
    with _threads(config.threads):
        images = _random_images(teacher, config.batch_size, 0)
        encoding.encode(*teacher.capture(images, layers, heads), teacher.scale)
        started = time.perf_counter()
        for _ in range(config.measure_batches):
            encoding.encode(*teacher.capture(images, layers, heads), teacher.scale)
        return config.batch_size * config.measure_batches / (time.perf_counter() - started)


def measure_compression(teacher: Teacher, encoding, layers, heads, compression: dict, threads: int) -> float:
    """Raw / stored bytes of the factor arrays for 4 random images (random weights: a rough guide)."""
    from attncache.pipeline.tools.fidelity import stored_bytes

    with _threads(threads):
        arrays = encoding.encode(*teacher.capture(_random_images(teacher, 4, 1), layers, heads), teacher.scale)
    return sum(a.nbytes for a in arrays.values()) / sum(stored_bytes(arrays, compression).values())


def array_breakdown(encoding, recipe, teacher: Teacher, layers, heads, key_bytes: int) -> dict[str, dict]:
    """Per-array trailing shape, dtype and uncompressed bytes per sample-view."""
    out = {}
    for name, spec in base_arrays(recipe.num_params).items():
        per = KEY_LENGTH_PREFIX + key_bytes if spec["dtype"] == "str" else \
            int(np.prod(spec["trailing_shape"])) * np.dtype(spec["dtype"]).itemsize
        out[name] = {"kind": "base", "trailing_shape": spec["trailing_shape"], "dtype": spec["dtype"],
                     "bytes_per_sample": per}
    try:
        specs = encoding.array_specs(len(layers), len(heads), teacher.num_tokens, teacher.head_dim)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    for s in specs:
        out[s.name] = {"kind": "factor", "trailing_shape": list(s.trailing_shape), "dtype": s.dtype,
                       "bytes_per_sample": int(np.prod(s.trailing_shape)) * np.dtype(s.dtype).itemsize}
    return out


def _layers_source(spec: str | None, num_layers: int) -> str:
    if spec is not None:
        return f"given: --layers {spec}"
    every = " (every layer: the teacher has 3 or fewer)" if num_layers <= 3 else ""
    return (f"default {DEFAULT_LAYERS_TEXT}{every}: all but the last 3 of {num_layers}, the layers a default "
            "student transfers; --layers : caches every layer")


def make_plan(config: PlanConfig) -> dict:
    if config.samples < 1 or config.views < 1:
        raise PlanError("--samples and --views must be at least 1")
    if config.images_per_s is not None and config.images_per_s <= 0:
        raise PlanError("--images-per-s must be > 0")
    encoding = parse_encoding(config.encoding)
    check_mode(encoding, config.mode)  # before the teacher is built: fail before work
    compression_text = encoding.compression(config.compression)
    compression = parse_compression(compression_text)
    factor = parse_factor(config.compression_factor)
    teacher = shape_teacher(config.teacher)
    layers = resolve_layers_or_default(config.layers, teacher.num_layers)
    heads = resolve_heads(config.heads, teacher.num_heads)
    recipe = parse_recipe(config.recipe, teacher.recipe_defaults())
    arrays = array_breakdown(encoding, recipe, teacher, layers, heads, config.key_bytes)
    if factor == "measured":
        factor = measure_compression(teacher, encoding, layers, heads, compression, config.threads)
        factor_source = f"measured with {compression_text} on random inputs and random weights (rough)"
    else:
        factor_source = "given" if factor else "none: uncompressed size (zstd gains ~1.1x on floats, more on ints)"
    factor_bytes = sum(a["bytes_per_sample"] for a in arrays.values() if a["kind"] == "factor")
    base_bytes = sum(a["bytes_per_sample"] for a in arrays.values() if a["kind"] == "base")
    index_bytes = SHARD_INDEX_BYTES / FACTOR_CHUNK_SLOTS * sum(a["kind"] == "factor" for a in arrays.values())
    stored_factor = factor_bytes / (factor or 1.0)
    per_sample = stored_factor + base_bytes + index_bytes
    sample_views = config.samples * config.views
    rate, rate_source = config.images_per_s, "given (--images-per-s)"
    if rate is None:
        rate = measure_images_per_s(teacher, encoding, layers, heads, config)
        rate_source = (f"measured here: teacher forward + Q/K capture + encoding on random inputs, batch "
                       f"{config.batch_size}, {config.threads} threads, {config.teacher.device}; excludes "
                       "decode, augmentation and writing")
    raw_maps = len(layers) * len(heads) * teacher.num_tokens ** 2 * 4
    exact_fp16 = 2 * len(layers) * len(heads) * teacher.num_tokens * teacher.head_dim * 2
    return {
        "teacher": teacher.config.name, "model_args": dict(teacher.config.model_args),
        "tokens": teacher.num_tokens, "head_dim": teacher.head_dim, "layers": list(layers),
        "layers_source": _layers_source(config.layers, teacher.num_layers), "heads": list(heads),
        "encoding": encoding.spec, "serves_qk": encoding.serves_qk, "mode": config.mode,
        "recipe": recipe.describe(), "compression": compression_text,
        "compression_source": "given" if config.compression is not None else "the encoding's default",
        "compression_factor": factor,
        "compression_factor_source": factor_source, "samples": config.samples, "views": config.views,
        "sample_views": sample_views, "arrays": arrays, "factor_bytes_per_sample": factor_bytes,
        "base_bytes_per_sample": base_bytes, "index_bytes_per_sample": index_bytes, "bytes_per_sample": per_sample,
        "total_bytes": per_sample * sample_views,
        "raw_fp32_map_bytes_per_sample": raw_maps, "x_smaller_than_fp32_maps": raw_maps / per_sample,
        "x_smaller_than_exact_fp16_factors": exact_fp16 / stored_factor,
        "images_per_s": rate, "images_per_s_source": rate_source,
        "predicted_seconds": sample_views / rate,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def plan_lines(plan: dict) -> list[str]:
    lines = [f"teacher: {plan['teacher']} {plan['model_args'] or ''}  tokens {plan['tokens']}, d {plan['head_dim']}",
             f"layers {plan['layers']} ({plan['layers_source']})  heads {plan['heads']}",
             f"encoding: {plan['encoding']} (serves Q/K: {'yes' if plan['serves_qk'] else 'no'})"
             + (f", mode {plan['mode']}: ok" if plan["mode"] else ""),
             f"recipe: {plan['recipe']}", "",
             f"{'array':>10} {'kind':>6} {'dtype':>8} {'trailing shape':>22} {'bytes/sample':>14}"]
    for name, a in plan["arrays"].items():
        lines.append(f"{name:>10} {a['kind']:>6} {a['dtype']:>8} {str(a['trailing_shape']):>22} "
                     f"{a['bytes_per_sample']:>14,}")
    lines += [f"{'index':>10} {'shard':>6} {'':>8} {'':>22} {plan['index_bytes_per_sample']:>14,}",
              "", f"compression {plan['compression']} ({plan['compression_source']}): factor {plan['compression_factor'] or 'not applied'} "
                  f"({plan['compression_factor_source']})",
              f"bytes per sample-view: {plan['bytes_per_sample']:,.0f} ({plan['x_smaller_than_fp32_maps']:.1f}x "
              f"smaller than fp32 maps, factors {plan['x_smaller_than_exact_fp16_factors']:.1f}x smaller than "
              "exact:fp16)",
              f"total: {plan['samples']:,} samples x {plan['views']} views = {plan['sample_views']:,} sample-views "
              f"-> {_human_bytes(plan['total_bytes'])} ({plan['total_bytes']:,.0f} bytes)",
              f"time: {_human_seconds(plan['predicted_seconds'])} at {plan['images_per_s']:,.1f} images/s "
              f"({plan['images_per_s_source']})"]
    return lines

"""Fidelity against bytes: what each encoding loses, what it costs on disk, and how fast it runs.

The teacher's Q/K are captured once for K samples; then for every encoding of a grid, in one run:
encode (timed), stored bytes (raw from the array specs, and compressed exactly as the store would:
the same zarr codecs, the store's inner chunks inside a shard, written to a scratch store),
decode to logits (timed, from the stored numpy arrays, as a trainer does) and
KL(teacher softmax || decoded softmax) per layer, averaged over samples, heads and queries.

Speeds: encode MB/s counts the float32 Q and K the encoder reads; decode MB/s counts the stored
(uncompressed) bytes the decoder reads. Both are also given as samples/s. `exact:fp16` is the
reference of the byte ratios. Random-init teachers are flagged: their attention is near-uniform,
so every encoding looks better than it would on a trained teacher.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from attncache.pipeline._util import atomic
from attncache.pipeline._util.files import Files
from attncache.pipeline._util.runtime import default_threads
from attncache.pipeline.augment.recipe import Recipe, parse_recipe
from attncache.pipeline.data.shards import BadSample, decode_sample, expand_shards, iter_shard
from attncache.pipeline.encodings.kl import attention_kl, exact_logits
from attncache.pipeline.encodings.spec import parse_encoding
from attncache.pipeline.store import layout
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.layout import compression_spec, factor_chunk_slots, parse_compression
from attncache.pipeline.teacher.model import Teacher, TeacherConfig, resolve_heads, resolve_layers

DEFAULT_GRID = ("exact:fp16", "exact:fp8", "exact:int8", "exact:int4",
                *(f"lowrank:r={r}:{q}" for r in (32, 16, 8, 4) for q in ("fp16", "int8")),
                *(f"lowrank:r={r}:{q}" for r in (16, 8) for q in ("fp8", "int4")),
                "lowrank:r=2:int4")  # the default encoding (pipeline/encodings/default.py): check it on your teacher
REFERENCE = "exact:fp16"
EACH_ENCODINGS_OWN = "each encoding's own default"
RANDOM_WEIGHTS_WARNING = ("teacher has RANDOM weights: its attention is near-uniform, so every encoding looks "
                          "better than on a trained teacher; use these KL figures for bytes and speed only")


@dataclass(frozen=True)
class FidelityConfig:
    teacher: TeacherConfig
    data: tuple[str, ...] = ()
    samples: int = 32
    recipe: str = "eval"
    seed: int = 0
    layers: str = ":"
    heads: str | None = None
    encodings: tuple[str, ...] = ()  # () = DEFAULT_GRID, skipping entries that do not fit the teacher
    compression: str | None = None  # None: each encoding's own, as precompute would write it
    batch_size: int = 8
    threads: int = field(default_factory=default_threads)


@dataclass(frozen=True)
class Captured:
    """Q/K of the chosen samples: float32 [K, L, H, N, d] on the teacher's device."""

    q: torch.Tensor
    k: torch.Tensor
    keys: list[str]
    scale: float


# ---------------------------------------------------------------------------------------------- capture


def replayed_images(data: tuple[str, ...], recipe: Recipe, seed: int, samples: int) -> tuple[torch.Tensor, list[str]]:
    """The first `samples` decodable samples in shard order, augmented as view 0 of a precompute."""
    images, keys = [], []
    for url in expand_shards(list(data)):
        for entry in iter_shard(url):
            try:
                image, _ = decode_sample(url, entry)
            except BadSample:
                continue
            images.append(recipe.draw_and_apply(image, seed, entry.key, 0)[1])
            keys.append(entry.key)
            if len(images) == samples:
                return torch.stack(images), keys
    if not images:
        raise ValueError(f"no usable samples in {list(data)}")
    return torch.stack(images), keys


def capture(teacher: Teacher, images: torch.Tensor, layers, heads, batch_size: int, keys: list[str]) -> Captured:
    qs, ks = [], []
    for start in range(0, len(images), batch_size):
        q, k = teacher.capture(images[start:start + batch_size], layers, heads)
        qs.append(q)
        ks.append(k)
    return Captured(torch.cat(qs), torch.cat(ks), keys, teacher.scale)


# ---------------------------------------------------------------------------------------------- measure


def raw_bytes_per_sample(encoding, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> dict[str, int]:
    return {s.name: int(np.prod(s.trailing_shape)) * np.dtype(s.dtype).itemsize
            for s in encoding.array_specs(num_layers, num_heads, num_tokens, head_dim)}


def stored_bytes(arrays: dict[str, np.ndarray], compression: dict) -> dict[str, int]:
    """Bytes of each array once written as the store writes factors (the store's inner chunks, one
    shard for all, the store's codecs): shard files of a scratch zarr store, index included."""
    with tempfile.TemporaryDirectory(prefix="attncache-fidelity-") as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        out = {}
        for name, block in arrays.items():
            arr = group.create_array(name, shape=block.shape, dtype=block.dtype, chunks=(factor_chunk_slots(len(block)), *block.shape[1:]),
                                     shards=block.shape, compressors=layout.compressors(compression), fill_value=0)
            arr[:] = block
            out[name] = sum(p.stat().st_size for p in Path(tmp, name, "c").rglob("*") if p.is_file())
    return out


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    if isinstance(result, torch.Tensor) and result.is_cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def measure(encoding, cap: Captured, compression: dict, batch_size: int) -> dict:
    """Encode, store, decode and KL for one encoding over all captured samples."""
    n, num_layers, num_heads, num_tokens, head_dim = cap.q.shape
    raw = raw_bytes_per_sample(encoding, num_layers, num_heads, num_tokens, head_dim)
    parts, encode_s, decode_s, kl_sum = [], 0.0, 0.0, torch.zeros(num_layers, dtype=torch.float64)
    warm = encoding.encode(cap.q[:batch_size], cap.k[:batch_size], cap.scale)  # one-off costs stay out of the timing
    encoding.decode(warm, "logits", cap.scale, cap.q.device)
    for start in range(0, n, batch_size):
        q, k = cap.q[start:start + batch_size], cap.k[start:start + batch_size]
        arrays, seconds = _timed(lambda: encoding.encode(q, k, cap.scale))
        encode_s += seconds
        parts.append(arrays)
        logits, seconds = _timed(lambda: encoding.decode(arrays, "logits", cap.scale, q.device))
        decode_s += seconds
        kl_sum += attention_kl(exact_logits(q, k, cap.scale), logits).double().cpu() * len(q)
    whole = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    stored = stored_bytes(whole, compression)
    qk_mb = cap.q.numel() * 4 * 2 / 1e6
    kl = (kl_sum / n).tolist()
    return {"encoding": encoding.spec, "serves_qk": encoding.serves_qk,
            "raw_bytes_per_sample": sum(raw.values()), "bytes_per_sample": sum(stored.values()) / n,
            "arrays_bytes_per_sample": {name: b / n for name, b in stored.items()},
            "kl_mean": float(np.mean(kl)), "kl_per_layer": kl,
            "encode_mb_s": qk_mb / encode_s, "decode_mb_s": sum(raw.values()) * n / 1e6 / decode_s,
            "encode_samples_s": n / encode_s, "decode_samples_s": n / decode_s}


def run_grid(cap: Captured, encodings: tuple[str, ...], compression: str | None,
             batch_size: int) -> tuple[list[dict], list[str]]:
    """Rows for each encoding, its bytes stored with `compression` (None: the encoding's own default,
    what a precompute without --compression writes); with the default grid, entries that do not fit
    the teacher (rank above the head dim) are skipped and named, while an explicit list fails on them."""
    chosen, notes = list(encodings or DEFAULT_GRID), []
    shape = tuple(cap.q.shape[1:])
    rows = []
    for spec in chosen:
        encoding = parse_encoding(spec)
        try:
            encoding.array_specs(*shape)
        except ValueError as exc:
            if encodings:
                raise
            notes.append(f"skipped {spec}: {exc}")
            continue
        used = encoding.compression(compression)
        rows.append({**measure(encoding, cap, parse_compression(used), batch_size), "compression": used})
    _add_ratios(rows)
    return rows, notes


def _add_ratios(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["encoding"] == REFERENCE), None)
    for r in rows:
        r["x_smaller_than_exact_fp16"] = ref["bytes_per_sample"] / r["bytes_per_sample"] if ref else None


# ---------------------------------------------------------------------------------------------- teacher mode


def run_fidelity(config: FidelityConfig) -> dict:
    if config.samples < 1:
        raise ValueError("--samples must be at least 1")
    for spec in config.encodings:
        parse_encoding(spec)  # a typo fails before the teacher runs
    torch.set_num_threads(config.threads)
    teacher = Teacher(config.teacher)
    recipe = parse_recipe(config.recipe, teacher.recipe_defaults())
    layers = resolve_layers(config.layers, teacher.num_layers)
    heads = resolve_heads(config.heads, teacher.num_heads)
    images, keys = replayed_images(config.data, recipe, config.seed, config.samples)
    cap = capture(teacher, images, layers, heads, config.batch_size, keys)
    rows, notes = run_grid(cap, config.encodings, config.compression, config.batch_size)
    return _report(teacher, layers, heads, cap, rows, notes, config.compression, config.batch_size, config.threads,
                   recipe=recipe.describe(), source="teacher")


def _report(teacher: Teacher, layers, heads, cap: Captured, rows, notes, compression, batch_size, threads, **extra) -> dict:
    identity = teacher.identity()
    random_init = identity["random_init_seed"] is not None
    return {"teacher": identity["name"], "model_args": identity["model_args"],
            "weights_sha256": identity["weights_sha256"], "random_init": random_init,
            "warnings": [RANDOM_WEIGHTS_WARNING] if random_init else [],
            "samples": len(cap.keys), "layers": list(layers), "heads": list(heads),
            "tokens": teacher.num_tokens, "head_dim": teacher.head_dim,
            "compression": compression or EACH_ENCODINGS_OWN,
            "device": str(cap.q.device), "threads": threads, "batch_size": batch_size,
            "raw_fp32_map_bytes_per_sample": len(layers) * len(heads) * teacher.num_tokens ** 2 * 4,
            **extra, "notes": notes, "results": rows}


# ---------------------------------------------------------------------------------------------- store mode


def store_teacher_config(store: CacheStore, given: TeacherConfig | None) -> TeacherConfig:
    """The store's teacher (name, model args) with weights from `given` (a name or directory,
    --teacher-checkpoint, --random-init), or, when nothing is given and the store was made with random
    weights, the store's own random-init seed. The caller checks the weights' fingerprint."""
    ident = store.meta["teacher"]
    args = tuple(sorted(ident["model_args"].items()))
    device = given.device if given is not None else "cpu"
    if given is not None and (given.name or given.checkpoint or given.random_init):
        if given.name and Path(given.name).is_dir():  # its config.json names model, arguments and weights
            return TeacherConfig(given.name, given.model_args, given.checkpoint, given.random_init, given.seed, device)
        return TeacherConfig(given.name or ident["name"], given.model_args or args, given.checkpoint,
                             given.random_init, given.seed, device)
    if ident.get("random_init_seed") is not None:
        return TeacherConfig(ident["name"], args, None, True, int(ident["random_init_seed"]), device)
    raise ValueError(f"{store.path} was made with trained weights ({ident['name']}, "
                     f"{ident.get('checkpoint') or 'hub weights'}): pass --teacher-checkpoint FILE or --teacher DIR")


def cached_samples(store: CacheStore, view: int, samples: int
                   ) -> tuple[list[int], list[str], torch.Tensor, dict[str, np.ndarray]]:
    """The first `samples` cached samples of `view` in slot order: slots, keys, replayed pixels and
    their factor arrays, all from units whose bytes pass their markers (`read_verified_unit`): a
    damaged unit is refused, not scored."""
    recipe = Recipe.from_json(store.meta["recipe"]["ops"])
    slots, keys, images, factors = [], [], [], []
    for unit in store.units():
        if unit.view != view or not store.unit_done(unit):
            continue
        data = store.read_verified_unit(view, unit.shard_index)
        for entry in iter_shard(unit.url):
            if len(slots) == samples:
                break
            if not data.valid[entry.position]:
                continue
            image, _ = decode_sample(unit.url, entry)
            images.append(recipe.apply(data.aug[entry.position, :recipe.num_params], image))
            slots.append(store.slot_range(unit.shard_index)[0] + entry.position)
            keys.append(entry.key)
            factors.append({n: a[entry.position] for n, a in data.factors.items()})
        if len(slots) == samples:
            break
    if not slots:
        raise ValueError(f"{store.path}: no finished unit holds samples of view {view}")
    stacked = {n: np.stack([f[n] for f in factors]) for n in factors[0]}
    return slots, keys, torch.stack(images), stacked


def run_store_fidelity(path: str, teacher_cfg: TeacherConfig | None, samples: int, view: int = 0,
                       encodings: tuple[str, ...] = (), compression: str | None = None, batch_size: int = 8,
                       threads: int | None = None) -> dict:
    """The store's cached factors against the teacher re-run on the same replayed pixels, beside a
    fresh encoding with the store's own spec and `exact:fp16` (or `encodings`)."""
    from attncache.pipeline.store.checks import inspect_store

    store = CacheStore.open(path)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    teacher = Teacher(store_teacher_config(store, teacher_cfg))
    if teacher.weights_sha256 != store.meta["teacher"]["weights_sha256"]:
        raise ValueError(f"teacher weights {teacher.weights_sha256[:12]} differ from the store's teacher "
                         f"{store.meta['teacher']['weights_sha256'][:12]}: pass the weights the store was made with")
    layers, heads = tuple(store.meta["layers"]), tuple(store.meta["heads"])
    slots, keys, images, factors = cached_samples(store, view, samples)
    cap = capture(teacher, images, layers, heads, batch_size, keys)
    compression = compression or compression_spec(store.meta["compression"])
    grid = encodings or tuple(dict.fromkeys((store.encoding.spec, REFERENCE)))
    rows, notes = run_grid(cap, grid, compression, batch_size)
    rows.insert(0, _cached_row(store, factors, cap, inspect_store(path)["bytes_per_sample"], batch_size))
    _add_ratios(rows)
    return _report(teacher, layers, heads, cap, rows, notes, compression, batch_size, threads,
                   recipe=store.meta["recipe"]["spec"], source="store", store=str(path), view=view)


def _cached_row(store: CacheStore, factors: dict[str, np.ndarray], cap: Captured, bytes_per_sample: float,
                batch_size: int) -> dict:
    """The store's own (checked) bytes, decoded (timed) and compared with the re-run teacher, batch by batch."""
    raw, seconds, kl_sum = 0, 0.0, torch.zeros(cap.q.shape[1], dtype=torch.float64)
    count = len(next(iter(factors.values())))
    store.encoding.decode({n: a[:batch_size] for n, a in factors.items()}, "logits", cap.scale, cap.q.device)  # warm-up
    for start in range(0, count, batch_size):
        arrays = {n: a[start:start + batch_size] for n, a in factors.items()}
        raw += sum(a.nbytes for a in arrays.values())
        logits, spent = _timed(lambda: store.encoding.decode(arrays, "logits", cap.scale, cap.q.device))
        seconds += spent
        q, k = cap.q[start:start + batch_size], cap.k[start:start + batch_size]
        kl_sum += attention_kl(exact_logits(q, k, cap.scale), logits).double().cpu() * len(q)
    kl = (kl_sum / count).tolist()
    return {"encoding": f"{store.encoding.spec} (store)", "serves_qk": store.encoding.serves_qk,
            "raw_bytes_per_sample": raw / count, "bytes_per_sample": bytes_per_sample,
            "arrays_bytes_per_sample": None, "kl_mean": float(np.mean(kl)), "kl_per_layer": kl,
            "encode_mb_s": None, "decode_mb_s": raw / 1e6 / seconds, "encode_samples_s": None,
            "decode_samples_s": count / seconds, "compression": compression_spec(store.meta["compression"])}


def is_store(path: str) -> bool:
    return Files(path).is_file("zarr.json")


# ---------------------------------------------------------------------------------------------- output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """Markdown tables: the frontier (one row per encoding), then KL per layer."""
    lines = [f"# fidelity of {report['teacher']} {report['model_args'] or ''} ({report['source']} mode)",
             f"samples {report['samples']}, layers {report['layers']}, heads {report['heads']}, "
             f"tokens {report['tokens']}, d {report['head_dim']}, compression {report['compression']}, "
             f"device {report['device']}, threads {report['threads']}, batch {report['batch_size']}"]
    lines += [f"WARNING: {w}" for w in report["warnings"]] + [f"note: {n}" for n in report["notes"]]
    lines += ["", "| encoding | Q/K | raw bytes/sample | compression | stored bytes/sample | x smaller than "
                  "exact:fp16 | mean KL | encode MB/s | decode MB/s | encode samples/s | decode samples/s |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| `{r['encoding']}` | {'yes' if r['serves_qk'] else 'no'} | {r['raw_bytes_per_sample']:,.0f} | "
                     f"{r['compression']} | {r['bytes_per_sample']:,.0f} | {_fmt(r['x_smaller_than_exact_fp16'], '.1f')} | "
                     f"{r['kl_mean']:.3g} | {_fmt(r['encode_mb_s'], ',.1f')} | {_fmt(r['decode_mb_s'], ',.1f')} | "
                     f"{_fmt(r['encode_samples_s'], ',.1f')} | {_fmt(r['decode_samples_s'], ',.1f')} |")
    lines += ["", "| encoding | " + " | ".join(f"KL layer {l}" for l in report["layers"]) + " |",
              "|---|" + "---:|" * len(report["layers"])]
    for r in report["results"]:
        lines.append(f"| `{r['encoding']}` | " + " | ".join(f"{v:.3g}" for v in r["kl_per_layer"]) + " |")
    return "\n".join(lines)


def _family(spec: str) -> str:
    """`exact` or `lowrank:<quant>`: points of one family share a colour."""
    spec = spec.split(" ")[0]
    return "exact" if spec.startswith("exact") else "lowrank:" + spec.split(":")[-1]


def plot_frontier(report: dict, out: str) -> str:
    """Two panels: mean KL against stored bytes per sample (log-log), and KL per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-10  # exact encodings can reach KL 0, which a log axis cannot show
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    families = list(dict.fromkeys(_family(r["encoding"]) for r in report["results"]))
    family_colour = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for i, r in enumerate(report["results"]):
        kl, family = max(r["kl_mean"], floor), _family(r["encoding"])
        left.scatter(r["bytes_per_sample"], kl, s=28, color=family_colour[family], label=family)
        left.annotate(r["encoding"], (r["bytes_per_sample"], kl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        right.plot(report["layers"], [max(v, floor) for v in r["kl_per_layer"]], marker="o", ms=3, lw=1,
                   color=plt.cm.tab20(i % 20), label=r["encoding"])
    right.set_xticks(report["layers"])
    handles, labels = left.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    left.legend(unique.values(), unique.keys(), fontsize=7)
    left.set(xscale="log", yscale="log", xlabel=f"stored bytes per sample ({report['compression']})",
             ylabel="mean KL(teacher || decoded)", title="fidelity vs bytes")
    right.set(yscale="log", xlabel="teacher layer", ylabel="KL", title="KL per layer")
    right.legend(fontsize=6, ncol=2)
    title = f"{report['teacher']}: {report['samples']} samples, {report['tokens']} tokens"
    if report["random_init"]:
        title += "  [RANDOM WEIGHTS: flat attention, KL unrealistically low]"
    fig.suptitle(title, color="red" if report["random_init"] else "black")
    fig.tight_layout()
    atomic.save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out

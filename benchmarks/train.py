"""Student training speed: scratch, distill from the cache, distill with an online teacher, in one run.

    .venv/bin/attncache bench train [--steps 40] [--batch-size 64] [--rounds 2] [--json out.json]

Same student, batch size, loader workers and steps for every mode, through `pipeline.train.loop.train`
(the code `attncache train` runs): (a) scratch, (b) distill from a cache with the default encoding,
(c) distill with an online teacher of the student's size, (d) distill with an online teacher twice
as wide (same heads and tokens). (t) is the bare teacher forward (Q/K capture) on one batch of
ready tensors; the most a cache can save over an online teacher is that forward, so the speed-up
limit of (b) over (c) is (1/a + t) / (1/a). It also times the decoding of one batch's cached
factors to logits against a step of (b). Each mode runs `--rounds` times interleaved (a b c d
a b c d ...) and keeps its fastest round, so drift of the machine hits every mode alike. Teachers
are randomly initialised: the speed of a forward does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from attncache.benchmarks import HelpFormatter

from attncache.pipeline.encodings.spec import DEFAULT_ENCODING
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.studies.synth import SynthConfig, synth_dataset
from attncache.pipeline.teacher.model import Teacher, TeacherConfig
from attncache.pipeline.train.loader import epoch_loader
from attncache.pipeline.train.loop import TrainConfig, train
from attncache.pipeline.train.optim import OptimConfig
from attncache.pipeline.train.session import TransferSpec, build_session, train_stream
from attncache.pipeline.train.student import StudentConfig

MODEL = "vit_tiny_patch16_224"
SHAPE = {"img_size": 32, "patch_size": 4, "depth": 6, "num_heads": 4}  # 65 tokens


def teacher_cfg(width: int, seed: int = 0) -> TeacherConfig:
    args = dict(SHAPE, embed_dim=width, num_classes=4)
    return TeacherConfig(MODEL, tuple(sorted(args.items())), random_init=True, seed=seed)


def teacher_forward_s(cfg: TeacherConfig, batch_size: int, threads: int, repeats: int = 10) -> float:
    """Seconds of one teacher Q/K capture on a ready batch (what an online step adds)."""
    torch.set_num_threads(threads)
    teacher = Teacher(cfg)
    x = torch.randn(batch_size, 3, SHAPE["img_size"], SHAPE["img_size"], generator=torch.Generator().manual_seed(0))
    layers = tuple(range(teacher.num_layers))
    teacher.capture(x, layers)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        teacher.capture(x, layers)
        best = min(best, time.perf_counter() - started)
    return best


def decode_s_per_batch(spec: TransferSpec, data: str, batch_size: int, threads: int, repeats: int = 20) -> float:
    """Seconds to decode one batch's cached factors to logits of the transferred layers (what (b)
    adds per step over (a) besides the loss), on the training device."""
    torch.set_num_threads(threads)
    session = build_session(spec, "cpu")
    stream = train_stream(session, (data,), 0, 4, 0.0, 0)
    batch = next(iter(epoch_loader(stream, 0, batch_size, 0)))
    session.signal(batch, "cpu")
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.signal(batch, "cpu")
        best = min(best, time.perf_counter() - started)
    return best


def run_mode(name: str, spec: TransferSpec, data: str, out: Path, args) -> float:
    config = TrainConfig(data=(data,), out=str(out), spec=spec, max_steps=args.steps, batch_size=args.batch_size,
                         workers=args.workers, threads=args.threads, progress=False, checkpoint_every=10 ** 9,
                         log_every=10 ** 9, optim=OptimConfig(warmup_epochs=0.0))
    result = train(config)
    shutil.rmtree(out)
    return result.steps / result.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step")
    parser.add_argument("--width", type=int, default=96, help="Embed dim of the student and same-size teacher.")
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all modes (fastest kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        info = synth_dataset(tmp / "data", num_train=1024, num_val=0, config=SynthConfig(image_size=32, num_classes=4), shard_size=256, seed=0)
        same, wide = teacher_cfg(args.width), teacher_cfg(2 * args.width)
        cache = tmp / "cache.zarr"
        run_precompute(PrecomputeConfig(data=(info["train"],), out=str(cache), teacher=same, views=1,
                                        encoding=DEFAULT_ENCODING, batch_size=64, workers=1, threads=args.threads,
                                        progress=False))
        student = StudentConfig(MODEL, tuple(sorted(dict(SHAPE, embed_dim=args.width).items())), 4, 0.0, 0)
        layers = f"0:{SHAPE['depth'] - 3}"
        modes = {"a_scratch": TransferSpec(student, "scratch", layers),
                 "b_distill_cache": TransferSpec(student, "distill", layers, cache=str(cache)),
                 "c_distill_online_same": TransferSpec(student, "distill", layers, teacher=same),
                 "d_distill_online_2x_wide": TransferSpec(student, "distill", layers, teacher=wide)}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        forward: dict[str, list[float]] = {"t_same": [], "t_2x_wide": []}
        for round_index in range(args.rounds):
            for name, spec in modes.items():
                rates[name].append(run_mode(name, spec, info["train"], tmp / f"run-{name}-{round_index}", args))
                print(f"round {round_index} {name}: {rates[name][-1]:.2f} steps/s", flush=True)
            forward["t_same"].append(teacher_forward_s(same, args.batch_size, args.threads))
            forward["t_2x_wide"].append(teacher_forward_s(wide, args.batch_size, args.threads))
        best = {m: max(v) for m, v in rates.items()}
        decode_s = decode_s_per_batch(modes["b_distill_cache"], info["train"], args.batch_size, args.threads)
        t_same, t_wide = min(forward["t_same"]), min(forward["t_2x_wide"])
        step_a = 1.0 / best["a_scratch"]
        limit_same, limit_wide = (step_a + t_same) / step_a, (step_a + t_wide) / step_a
        speedup_same = best["b_distill_cache"] / best["c_distill_online_same"]
        speedup_wide = best["b_distill_cache"] / best["d_distill_online_2x_wide"]
        report = {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
                  "steps_per_s": best, "all_rounds": rates, "teacher_forward_s": {"same": t_same, "2x_wide": t_wide},
                  "b_over_a": best["b_distill_cache"] / best["a_scratch"],
                  "decode_s_per_batch": decode_s, "decode_over_step_b": decode_s * best["b_distill_cache"],
                  "speedup_over_online_same": speedup_same, "limit_same": limit_same,
                  "fraction_of_limit_same": (speedup_same - 1) / (limit_same - 1) if limit_same > 1 else None,
                  "speedup_over_online_2x_wide": speedup_wide, "limit_2x_wide": limit_wide,
                  "speedup_over_limit_same": speedup_same / limit_same,
                  "speedup_over_limit_2x_wide": speedup_wide / limit_wide}
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

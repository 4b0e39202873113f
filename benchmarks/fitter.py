"""Low-rank fitters, the full eigh of every store before 2026-12-03, the subspace fitter of that day's
stores and the CholeskyQR fitter of new stores, in one run (BENCHMARKS.md, "Low-rank fitter (issue 18
item 2)").

    .venv/bin/python -m attncache.benchmarks.fitter [--teacher DIR]   # eigh, subspace and cholqr
    .venv/bin/python -m attncache.benchmarks.fitter --stages            # where the eigh fitter's time goes
    .venv/bin/python -m attncache.benchmarks.fitter --neighbour         # LAPACK threads beside a busy process

For each input set: encode MB/s of raw Q/K (float32 bytes in) through `fit_factors` with each fitter,
the mean KL(teacher softmax || decoded softmax) of unquantised factors at ranks 1, 2, 4, 8, 16 and 32
(those below d), and whether each fitter's factors are bit-identical across two runs and across torch
thread counts 1 and 2. `--teacher DIR` adds a trained teacher's Q/K on its own val images (e.g. the
d = 64 teacher of `python -m attncache.benchmarks.teacher_d64 --out /tmp/d64`: `--teacher
/tmp/d64/teacher64`, images from /tmp/d64/data/val-000000.tar).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from attncache.pipeline.encodings.fit import CHOLQR, EIGH, SUBSPACE, _cholesky_upper, _top_singular, fit_factors
from attncache.pipeline.encodings.kl import attention_kl, exact_logits

FITTERS = {"eigh": EIGH, "subspace": SUBSPACE, "cholqr": CHOLQR}


def low_rank_plus_noise(b, layers, heads, tokens, dim, rank=8, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, layers, heads, tokens, rank)
    mix = torch.randn(b, layers, heads, rank, dim, generator=g)
    q = torch.randn(*shape, generator=g) @ mix + noise * torch.randn(b, layers, heads, tokens, dim, generator=g)
    k = torch.randn(*shape, generator=g) @ mix + noise * torch.randn(b, layers, heads, tokens, dim, generator=g)
    return q * 2, k * 2


def vit_qk(depth, embed, heads, b=16, img=32, patch=4, depth_used=None):
    from attncache.pipeline.teacher.model import Teacher, TeacherConfig

    args = {"img_size": img, "patch_size": patch, "depth": depth, "embed_dim": embed, "num_heads": heads,
            "num_classes": 10}
    teacher = Teacher(TeacherConfig("vit_tiny_patch16_224", tuple(sorted(args.items())), random_init=True))
    x = torch.randn(b, 3, img, img, generator=torch.Generator().manual_seed(0))
    q, k = teacher.capture(x, tuple(range(depth_used or teacher.num_layers)))
    return q, k, teacher.scale


def speed(q, k, scale, rank, fitter):
    return (q.numel() + k.numel()) * 4 / best_ms(lambda: fit_factors(q, k, scale, rank, fitter)) / 1e3


def bits_hold(q, k, scale, rank, fitter):
    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fit_factors(q, k, scale, rank, fitter)
        finally:
            torch.set_num_threads(before)
    ref = run(2)
    return all(torch.equal(x, y) for other in (run(2), run(1)) for x, y in zip(ref, other))


def trained_qk(teacher_dir: str, images: int = 64):
    """A trained teacher's Q/K of every layer on the first `images` val images next to it (teacher_d64's
    layout: DIR/../data/val-000000.tar)."""
    from attncache.pipeline.data.shards import decode_sample, iter_shard
    from attncache.pipeline.teacher.model import Teacher, TeacherConfig
    import numpy as np

    teacher = Teacher(TeacherConfig(teacher_dir))
    url = str(Path(teacher_dir).parent / "data" / "val-000000.tar")
    pixels = []
    for entry in iter_shard(url):
        image, _ = decode_sample(url, entry)
        pixels.append(np.asarray(image, dtype=np.float32) / 255.0)
        if len(pixels) == images:
            break
    x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) - 0.5) / 0.5
    q, k = teacher.capture(x, tuple(range(teacher.num_layers)))
    return q, k, teacher.scale


def measure(name, q, k, scale):
    ref = exact_logits(q, k, scale)
    d = q.shape[-1]
    rows = {}
    for rank in [r for r in (1, 2, 4, 8, 16, 32) if r < d]:
        row = {}
        for name_, fitter in FITTERS.items():
            a, b = fit_factors(q, k, scale, rank, fitter)
            row[name_] = {"kl": float(attention_kl(ref, a @ b.transpose(-1, -2)).mean()),
                          "mb_s": round(speed(q, k, scale, rank, fitter), 1),
                          "bit_identical_runs_and_threads": bits_hold(q, k, scale, rank, fitter)}
        for new in ("subspace", "cholqr"):
            row[f"kl_{new}_vs_eigh_pct"] = round(100 * (row[new]["kl"] / max(row["eigh"]["kl"], 1e-300) - 1), 4)
        rows[rank] = row
        print(json.dumps({"inputs": name, "shape": list(q.shape), "rank": rank, **row}), flush=True)
    return rows


def best_ms(fn, repeats=3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def stages(shape, rank=8):
    """Milliseconds per stage of `fit_factors` on random Gaussian Q/K of `shape`, each stage alone."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    kc = k - k.mean(-2, keepdim=True)
    gq, gk = q.transpose(-1, -2) @ q, kc.transpose(-1, -2) @ kc
    rq, rk = _cholesky_upper(gq), _cholesky_upper(gk)
    core = rq @ rk.transpose(-1, -2)
    top, _ = _top_singular(core, rank)
    w = torch.linalg.solve_triangular(rq, top, upper=True).float()
    chol = torch.linalg.cholesky_ex
    timed = {"fit_factors": lambda: fit_factors(q, k, 0.125, rank, EIGH),
             "gram x2 fp32": lambda: (q.transpose(-1, -2) @ q, kc.transpose(-1, -2) @ kc),
             "cast fp64 x2": lambda: (gq.double(), gk.double()),
             "cholesky_ex fp64 x2": lambda: (chol(gq.double(), upper=True), chol(gk.double(), upper=True)),
             "cholesky_ex fp32 x2": lambda: (chol(gq, upper=True), chol(gk, upper=True)),
             "core matmul fp64": lambda: rq @ rk.transpose(-1, -2),
             "eigh fp64": lambda: torch.linalg.eigh(core @ core.transpose(-1, -2)),
             "eigh fp32": lambda: torch.linalg.eigh((core @ core.transpose(-1, -2)).float()),
             "svd fp64 core": lambda: torch.linalg.svd(core),
             "solve_triangular x2": lambda: (torch.linalg.solve_triangular(rq, top, upper=True),
                                             torch.linalg.solve_triangular(rk, top, upper=True)),
             "final matmuls x2": lambda: (q @ w, kc @ w),
             "qr fp32 of Q": lambda: torch.linalg.qr(q)}
    ms = {name: round(best_ms(fn), 1) for name, fn in timed.items()}
    print(json.dumps({"shape": list(shape), "rank": rank, **ms}), flush=True)


def _busy(seconds: float) -> None:
    """A neighbour: another process's 2-thread matmuls (another precompute worker on the node)."""
    torch.set_num_threads(2)
    x = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)


def neighbour(shape=(8, 9, 6, 197, 64), rank=8):
    """`fit_factors` at 2 threads with its d x d LAPACK on every thread (what stores were written
    with before `one_cpu_thread`) against one thread, alone and beside a busy process, side by side
    in one run; the factors are compared bit for bit."""
    import contextlib
    import multiprocessing

    import attncache.pipeline.encodings.fit as fit

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    every_thread = lambda device: contextlib.nullcontext()  # noqa: E731
    one_thread = fit.one_cpu_thread
    ref = fit.fit_factors(q, k, 0.125, rank, EIGH)
    for busy in (False, True):
        proc = None
        if busy:
            proc = multiprocessing.get_context("spawn").Process(target=_busy, args=(120.0,), daemon=True)
            proc.start()
            time.sleep(3)
        try:
            row = {"neighbour": busy, "shape": list(shape), "rank": rank}
            for name, ctx in (("lapack_every_thread_ms", every_thread), ("lapack_one_thread_ms", one_thread)):
                fit.one_cpu_thread = ctx
                out = fit.fit_factors(q, k, 0.125, rank, EIGH)
                row[name] = round(best_ms(lambda: fit.fit_factors(q, k, 0.125, rank, EIGH)), 1)
                row[name.replace("_ms", "_bits_equal")] = all(torch.equal(x, y) for x, y in zip(ref, out))
            row["speedup"] = round(row["lapack_every_thread_ms"] / row["lapack_one_thread_ms"], 2)
            print(json.dumps(row), flush=True)
        finally:
            fit.one_cpu_thread = one_thread
            if proc is not None:
                proc.terminate()
                proc.join()


def main():
    from attncache.pipeline._util.runtime import keep_freed_memory

    keep_freed_memory()  # as precompute runs the fit
    torch.set_num_threads(2)
    if "--neighbour" in sys.argv[1:]:
        neighbour()
        return
    if "--stages" in sys.argv[1:]:
        for shape in ((32, 12, 6, 65, 64), (32, 12, 3, 197, 64), (32, 6, 4, 65, 24)):
            stages(shape)
        return
    if "--teacher" in sys.argv[1:]:
        teacher_dir = sys.argv[sys.argv.index("--teacher") + 1]
        q, k, scale = trained_qk(teacher_dir)
        measure(f"trained teacher {teacher_dir}, 64 val images", q, k, scale)
    q, k, scale = vit_qk(6, 96, 4)
    measure("random-init ViT d=24 (the project's teacher shape), 16 images", q, k, scale)
    q, k, scale = vit_qk(12, 192, 3)
    measure("random-init ViT-Ti d=64, 16 images", q, k, scale)
    q, k, scale = vit_qk(12, 384, 6, img=224, patch=16, b=8, depth_used=9)
    measure("random-init ViT-S/16 at 224 px (197 tokens, d=64), 8 images, layers 0-8", q, k, scale)
    q, k = low_rank_plus_noise(16, 6, 4, 65, 64)
    measure("rank-8-plus-noise d=64", q, k, 64 ** -0.5)


if __name__ == "__main__":
    main()

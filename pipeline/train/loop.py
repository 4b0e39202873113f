"""The student training loop: stream the cache, transfer attention, checkpoint, resume, evaluate.

Loss = soft-target cross-entropy (mixup/cutmix targets from the cache, label smoothing on top)
+ `distill_weight` x the strategy's transfer loss (summed over layers, as the paper's code). A run
directory holds `student.json` (what to rebuild), `checkpoint-<step>-<digest>.safetensors` + `state.json`
(the resumable state: weights, EMA, optimiser, step, loader position; one commit point, see
pipeline/train/checkpoint.py) and `metrics.jsonl`.

Resume is exact: the loader's batches are a pure function of (seed, epoch, rank, world size,
batch size, interleave, shuffle buffer), never of the loader workers, so
skipping the batches an epoch already gave rebuilds the loader position; the drop-path random state
is reseeded from (seed, step, rank) before every step, so no generator state has to be saved; the
learning rate is a function of the step alone (pipeline/train/optim.py), so no scheduler state either.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attncache.pipeline._util import atomic
from attncache.pipeline._util.runtime import default_threads, keep_freed_memory
from attncache.pipeline.data.shards import DEFAULT_MAX_SAMPLE_BYTES
from attncache.pipeline.teacher.model import TEACHER_CONFIG_FILE
from attncache.pipeline.train.checkpoint import TrainError, load_checkpoint, open_metrics, save_checkpoint
from attncache.pipeline.train.distributed import (World, barrier, dump_step, global_count, init_world, loss_weight,
    shutdown, stall_at, step_counts, sum_gradients, sum_over_ranks, wrap_model)
from attncache.pipeline.train.evaluate import EvalCounts, evaluate_counts
from attncache.pipeline.train.loader import DEFAULT_INTERLEAVE, StreamConfig, epoch_loader, steps_in_epoch, view_of
from attncache.pipeline.train.optim import OptimConfig, WeightEma
from attncache.pipeline.train.run_identity import check_or_write_run, recorded_eval_recipe, run_id, run_record
from attncache.pipeline.train.session import (Session, TransferSpec, build_session, eval_stream, infer_num_classes,
    train_stream)
from attncache.pipeline.train.student import transfer_loss
from attncache.pipeline.train.update import Updater

MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]
    out: str
    spec: TransferSpec
    distill_weight: float = 3.0
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 256
    interleave: int = DEFAULT_INTERLEAVE  # units mixed in each shuffle window
    smoothing: float = 0.1
    recipe: str = "train"  # used only without a cache
    eval_cache: str | None = None
    views: int | None = None  # use the cache's first N views [default: all]
    eval_data: tuple[str, ...] = ()
    amp: str = "auto"  # auto | bf16 | none
    device: str = "cpu"
    threads: int = field(default_factory=default_threads)
    checkpoint_every: int = 200
    log_every: int = 10
    eval_every: int | None = None  # epochs between val top-1 evaluations (metrics.jsonl, bar) [default: at the end]
    progress: bool = True
    optim: OptimConfig = OptimConfig()
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES  # bigger samples are never read (see pipeline/data/tar.py)


def set_determinism(threads: int) -> None:
    """The one place that fixes numerics: thread count and deterministic kernels."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # speed only: results are the same bits either way
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def reseed_step(seed: int, step: int, rank: int) -> None:
    """Drop path draws from torch's global generator inside timm; seed it per step from identity."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))


def autocast_dtype(amp: str, device: str) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    cuda = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda else None


# ---------------------------------------------------------------------------------------------- steps


def step_losses(session: Session, batch: dict, device, distill_weight: float, amp: torch.dtype | None,
                model: torch.nn.Module | None = None):
    """(total loss, cross-entropy, transfer loss or None) of one batch, all means over the batch.
    `model` is what the forward runs through (the DDP wrapper of session.model) [default: session.model]."""
    images = batch["image"].to(device, non_blocking=True)
    targets = batch["target"].to(device, non_blocking=True)
    session.context.set_teacher(session.signal(batch, device))
    with torch.autocast(torch.device(device).type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = (model or session.model)(images)
    ce = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    transfer = transfer_loss(session.mode.strategy, session.context)
    total = ce if transfer is None else ce + distill_weight * transfer
    return total, ce, transfer


def stop_if_non_finite(world: World, step: int, total, ce, transfer) -> None:
    """`check_finite_losses` on every rank at once: a rank's bad loss stops all of them at the same
    step (one flag summed over ranks), so none is left waiting in a gradient all-reduce."""
    if not world.distributed:
        if total is not None:
            check_finite_losses(step, total, ce, transfer)
        return
    local = None
    if total is not None:
        try:
            check_finite_losses(step, total, ce, transfer)
        except TrainError as e:
            local = e
    if sum_over_ranks(world, torch.tensor([float(local is not None)]))[0] > 0:
        raise local or TrainError(f"step {step}: another rank's loss is non-finite; training stopped, the last "
                                  "good checkpoint is kept")


def check_finite_losses(step: int, total, ce, transfer) -> None:
    """Stop at the first NaN/inf loss, naming the step and the term, before it reaches the weights
    (one sync per step; the checkpoint keeps the last good weights)."""
    terms = {"cross-entropy": ce, "transfer": transfer, "total (cross-entropy + --distill-weight x transfer)": total}
    values = [t.detach().float().reshape(()) for t in terms.values() if t is not None]
    if bool(torch.isfinite(torch.stack(values)).all()):
        return
    name, value = next((n, float(t.detach())) for n, t in terms.items() if t is not None and not torch.isfinite(t).all())
    raise TrainError(f"step {step}: the {name} loss is {value} (non-finite); training stopped, the last good "
                     f"checkpoint is kept; check the teacher signals (cache factors) or lower --lr")


class EpochCounts:
    """Samples per shard of an epoch: from the markers of its cached view (exact, skips excluded),
    or from one scan of the shards without a cache. Read once per view, not once per epoch: the
    schedule needs every epoch's step count at start-up."""

    def __init__(self, stream: StreamConfig):
        self.stream = stream
        self._by_view: dict[int | None, list[int]] = {}

    def __call__(self, epoch: int) -> list[int]:
        view = view_of(epoch, self.stream.views) if self.stream.cache else None
        if view not in self._by_view:
            self._by_view[view] = self._read(view)
        return self._by_view[view]

    def _read(self, view: int | None) -> list[int]:
        from attncache.pipeline.data.shards import build_manifest
        from attncache.pipeline.store.cache import CacheStore

        if view is None:
            return [s.count for s in build_manifest(list(self.stream.shards)).shards]
        store = CacheStore.open(self.stream.cache)
        return [(store.read_marker(view, i) or {"written": 0})["written"] for i in range(len(self.stream.shards))]


class EpochIncomplete(RuntimeError):
    """An epoch gave another number of samples than the cache (or the shards) hold."""


def check_epoch_complete(stream: StreamConfig, counts: EpochCounts, epoch: int, seen: int, skipped: int = 0) -> None:
    """Every usable sample of the epoch's view, once, over all ranks: else stop, never train on less.
    Without a cache the shards' counts include the bad samples the loader recorded and skipped
    (`skipped`, over all ranks); a cache's counts already exclude those precompute skipped."""
    expected = sum(counts(epoch)) - (0 if stream.cache else skipped)
    if seen != expected:
        raise EpochIncomplete(f"epoch {epoch}: the ranks together trained on {seen} samples, but the "
                              f"{'cache view ' + str(view_of(epoch, stream.views)) if stream.cache else 'shards'} "
                              f"hold {expected} usable samples")


def write_teacher_config(out: Path, spec: TransferSpec, session: Session) -> None:
    """Make the run directory a teacher directory (`precompute --teacher RUN_DIR`): a student that
    needs no teacher at evaluation is a ViT like any other, and can teach the next one."""
    if session.mode.strategy.uses_teacher_at_eval:
        return
    args = dict(spec.student.model_args, num_classes=spec.student.num_classes)
    atomic.write_json(out / TEACHER_CONFIG_FILE, {"model": spec.student.name, "model_args": args,
                                                  "weights": MODEL_FILE})


# ---------------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    steps: int
    epochs_started: int
    samples: int
    seconds: float
    final: dict | None  # rank 0 only
    out: str
    skipped: list[dict] = field(default_factory=list)  # bad samples met (shard, key, reason), once each
    main: bool = True  # rank 0 (or a single process): the one that reports


def train(cfg: TrainConfig) -> TrainResult:
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise ValueError("give exactly one of --max-steps or --epochs")
    world = init_world(cfg.device)
    try:
        return _train(replace(cfg, device=world.device), world)
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, world: World) -> TrainResult:
    set_determinism(cfg.threads)
    out = Path(cfg.out)
    num_classes = cfg.spec.student.num_classes
    session = build_session(cfg.spec, cfg.device, cfg.recipe)
    session.eval_recipe = recorded_eval_recipe(out, session.eval_recipe)  # a resumed run evaluates as recorded
    stream = train_stream(session, cfg.data, cfg.seed, num_classes, cfg.smoothing, cfg.shuffle_buffer, cfg.views,
                          cfg.interleave)
    evaluation = eval_stream(session, num_classes, cfg.eval_cache, cfg.eval_data)
    stream = replace(stream, max_sample_bytes=cfg.max_sample_bytes)
    if evaluation is not None:
        evaluation = (replace(evaluation[0], max_sample_bytes=cfg.max_sample_bytes), evaluation[1])
    epochs = cfg.epochs
    counts = EpochCounts(stream)
    first_epoch_steps = steps_in_epoch(counts(0), 0, cfg.seed, world.size, cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else sum(
        steps_in_epoch(counts(e), e, cfg.seed, world.size, cfg.batch_size) for e in range(epochs))
    warmup = int(round(cfg.optim.warmup_epochs * first_epoch_steps))
    if warmup >= total_steps and world.is_main and cfg.optim.warmup_epochs > 0:
        print(f"attncache train: warning: the warmup ({cfg.optim.warmup_epochs} epochs = {warmup} steps) is as long "
              f"as the whole run ({total_steps} steps): the peak --lr is never reached; lower --warmup-epochs",
              file=sys.stderr)
    updater = Updater.build(session.model, cfg.optim, total_steps, warmup)
    optimizer, ema = updater.optimizer, updater.ema
    record = run_record(cfg.spec.to_json(), cfg, session.recipe.to_json(), session.eval_recipe)
    rid = run_id(record)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        check_or_write_run(out, record)
    barrier(world)
    state = load_checkpoint(out, session.model, optimizer, ema, rid)
    metrics = open_metrics(out, state) if world.is_main else None
    state = state or {"step": 0, "epoch": 0, "step_in_epoch": 0, "samples": 0, "epoch_samples": 0}
    step, epoch, skip, samples = state["step"], state["epoch"], state["step_in_epoch"], state["samples"]
    epoch_samples = state["epoch_samples"]
    amp = autocast_dtype(cfg.amp, cfg.device)
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train {cfg.spec.mode}",
               disable=not (cfg.progress and world.is_main), dynamic_ncols=True)
    session.model.train()
    forward = wrap_model(world, session.model)  # after loading the checkpoint: DDP broadcasts rank 0's weights

    def done() -> bool:
        return step >= cfg.max_steps if cfg.max_steps is not None else epoch >= epochs

    in_epoch = skip
    skipped: dict[tuple, dict] = {}
    postfix: dict[str, str] = {}
    unlogged = None  # the metrics row of the last step, until it is written
    while not done():
        loader = epoch_loader(stream, epoch, cfg.batch_size, cfg.workers, world.rank, world.size)
        batches = iter(loader)
        for _ in range(skip):
            next(batches, None)
        in_epoch, exhausted = skip, False
        while not done():
            stall_at(step)
            batch = next(batches, None)
            n = 0 if batch is None else len(batch["key"])
            n_global, empty_ranks = step_counts(world, n)
            if n_global == 0:
                exhausted = True
                break
            epoch_samples += n_global
            reseed_step(cfg.seed, step, world.rank)
            # every rank has a batch: DDP sums the gradients during backward; else the ranks with a
            # batch run the bare module and one flat all-reduce sums them (pipeline/train/distributed.py).
            # The update itself (lr, clip, optimiser, EMA) is pipeline/train/update.py's, as pretraining's.
            through = forward if empty_ranks == 0 else session.model

            def losses():
                return step_losses(session, batch, cfg.device, cfg.distill_weight, amp, through) if n else (None,) * 3

            def backward(terms):
                if n:
                    (terms[0] * loss_weight(world, n, n_global)).backward()
                if empty_ranks:
                    sum_gradients(world, session.model)
                dump_step(step, world.rank, session.model, batch, "flat" if empty_ranks else "ddp")

            def check(terms):
                stop_if_non_finite(world, step + 1, *terms)

            lr, (loss, ce, transfer) = updater.step(step, losses, check, backward)
            step, in_epoch, samples = step + 1, in_epoch + 1, samples + n_global
            bar.update(1)
            if metrics is not None and loss is not None:
                # held as tensors until written (no device sync per step); an epoch's last step is
                # written at its end, so a run shorter than --log-every still has its curve
                unlogged = (step, epoch, lr, loss.detach(), ce.detach(), transfer, samples,
                            round(time.perf_counter() - started, 3))
                if step % cfg.log_every == 0 or done():
                    write_train_row(metrics, unlogged)
                    unlogged = None
                    postfix.update(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
                    bar.set_postfix(postfix)
            if step % cfg.checkpoint_every == 0 and world.is_main:
                save_checkpoint(out, session.model, optimizer, ema, {"step": step, "epoch": epoch, "step_in_epoch": in_epoch,
                                "samples": samples, "epoch_samples": epoch_samples}, rid, metrics)
        skipped.update(((s["shard"], s["key"]), s) for s in loader.skipped)
        if exhausted:
            epoch_skipped = global_count(world, len(loader.skipped))  # bad samples of every rank's units
            check_epoch_complete(stream, counts, epoch, epoch_samples, epoch_skipped)
            if metrics is not None:
                if unlogged is not None:
                    write_train_row(metrics, unlogged)
                    unlogged = None
                metrics.write(json.dumps({"step": step, "epoch_end": epoch, "epoch_samples": epoch_samples,
                                          "skipped": epoch_skipped, "skipped_samples": loader.skipped[:100]})
                              + "\n")
            epoch, skip, in_epoch, epoch_samples = epoch + 1, 0, 0, 0
            if evaluation is not None and cfg.eval_every and epoch % cfg.eval_every == 0 and not done():
                # every rank evaluates its part (as at the end); the last epoch's is the final eval below.
                # The next step reseeds from its identity, so the steps are the same with or without it.
                result = run_eval(session, evaluation, replace(cfg, progress=False), ema, world)
                postfix["val_top1"] = f"{result['top1']:.1f}"
                bar.set_postfix(postfix)
                if metrics is not None:
                    metrics.write(json.dumps({"step": step, "epoch": epoch - 1, "eval": result}) + "\n")
                    metrics.flush()
    bar.close()
    seconds = time.perf_counter() - started
    final = None
    if world.is_main:
        save_checkpoint(out, session.model, optimizer, ema, {"step": step, "epoch": epoch, "step_in_epoch": in_epoch,
                        "samples": samples, "epoch_samples": epoch_samples}, rid, metrics)
        atomic.save_safetensors({k: v.contiguous() for k, v in session.model.state_dict().items()}, out / MODEL_FILE)
        if ema is not None:
            atomic.save_safetensors({k: v.contiguous() for k, v in ema.state.items()}, out / "model_ema.safetensors")
        write_teacher_config(out, cfg.spec, session)
        atomic.remove_safetensors_temps(out)  # of a final write killed before, re-done just now
    if evaluation is not None:  # every rank evaluates its part of the split
        final = run_eval(session, evaluation, cfg, ema, world)
    if metrics is not None:
        if final is not None:
            metrics.write(json.dumps({"step": step, "eval": final}) + "\n")
            metrics.flush()
        metrics.close()
    barrier(world)
    return TrainResult(step, epoch, samples, seconds, final if world.is_main else None, str(out),
                       list(skipped.values()), world.is_main)


def write_train_row(metrics, row: tuple) -> None:
    """One training line of metrics.jsonl from (step, epoch, lr, loss, ce, transfer, samples, seconds)."""
    step, epoch, lr, loss, ce, transfer, samples, seconds = row
    record = {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss), "ce": float(ce),
              "transfer": None if transfer is None else float(transfer.detach()), "samples": samples,
              "seconds": seconds}
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


def run_eval(session: Session, evaluation, cfg: TrainConfig, ema: WeightEma | None, world: World = World()) -> dict:
    """Top-1 of the live weights (and the EMA's), each rank on its units of the eval split, the
    counts summed over ranks: the same result as one process on the whole split."""
    stream, signal = evaluation
    num_classes = cfg.spec.student.num_classes

    per_rank = torch.zeros(world.size, dtype=torch.float64)
    skipped: list[dict] = []

    def gathered(progress: bool):
        loader = epoch_loader(stream, 0, cfg.batch_size, cfg.workers, world.rank, world.size)
        counts = evaluate_counts(session.model, session.mode.strategy, session.context, signal, loader, cfg.device,
                                 num_classes, progress and world.is_main)
        per_rank[world.rank] = counts.total
        skipped.extend(loader.skipped)
        return EvalCounts.from_tensor(sum_over_ranks(world, counts.as_tensor()), num_classes).result()

    report = gathered(cfg.progress).to_json()
    report.update(skipped=global_count(world, len(skipped)), skipped_samples=skipped[:100])
    if world.distributed:
        report["samples_per_rank"] = [int(n) for n in sum_over_ranks(world, per_rank)]
    if ema is not None:
        live = {k: v.clone() for k, v in session.model.state_dict().items()}
        session.model.load_state_dict({**live, **ema.state})
        ema_result = gathered(False)
        session.model.load_state_dict(live)
        report.update(top1_ema=ema_result.top1, top5_ema=ema_result.top5)
    return report

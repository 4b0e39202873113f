"""`attncache teacher pretrain`: a teacher directory from MAE or supervised pre-training. Thin: parse, call."""
from __future__ import annotations

import json

import click

from attncache.cli import defaults
from attncache.cli import params as P
from attncache.pipeline._util.runtime import default_threads

_P = defaults.Pretrain()
_TINY = " ".join(f"{k}={v}" for k, v in defaults.TINY_VIT)


@click.group()
def teacher():
    """Make teachers: pre-train a tiny ViT here instead of downloading one."""


@teacher.command()
@click.option("--method", type=click.Choice(list(defaults.PRETRAIN_METHODS)), default="mae",
              help="mae: masked autoencoding on unlabelled images (the paper's main teacher); "
                   "supervised: cross-entropy on a labelled split.")
@click.option("--data", multiple=True, required=True, help=f"Shards to pre-train on (webdataset tars): {P.DATA_FORMS}. "
                                                           "Labels are read only for --method supervised.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Teacher directory to write.")
@click.option("--model", default=_P.model, help="timm model name.")
@click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
              help=f"timm argument; when none is given the tiny preset is used: {_TINY}.")
@click.option("--epochs", default=_P.epochs, type=P.EPOCHS, help="Passes over the data.")
@click.option("--batch-size", default=_P.batch_size, type=P.BATCH, help="Images per step.")
@click.option("--lr", default=_P.lr, type=P.RATE, help="Peak learning rate (AdamW, betas 0.9/0.95, cosine).")
@click.option("--warmup-epochs", default=_P.warmup_epochs, type=P.floats(0, 10**6), help="Linear warmup, in epochs.")
@click.option("--weight-decay", default=_P.weight_decay, type=P.floats(0, 100), help="AdamW weight decay.")
@click.option("--clip-grad", type=P.floats(0, 1e6, low_open=True), default=None, help="Clip the gradient norm [default: off].")
@click.option("--model-ema-decay", type=P.floats(0, 1, low_open=True, high_open=True), default=None,
              help="Keep an EMA of the encoder, written as model_ema.safetensors [default: off].")
@click.option("--mask-ratio", default=_P.mask_ratio, type=P.floats(0, 1, True, True), help="MAE: fraction of patches hidden from the encoder.")
@click.option("--decoder-dim", default=_P.decoder_dim, type=P.ints(1, 8192), help="MAE: width of the decoder.")
@click.option("--decoder-depth", default=_P.decoder_depth, type=P.ints(1, 64), help="MAE: blocks in the decoder.")
@click.option("--smoothing", default=_P.smoothing, type=P.FRACTION, help="Supervised: label smoothing.")
@click.option("--num-classes", type=P.CLASSES, default=None, help="Supervised: classes [default: max label + 1].")
@click.option("--eval-data", multiple=True, help="Held-out shards, in the forms of --data, evaluated every --eval-every "
                                                 "epochs (pretrain.json's history and the progress bar): val top-1 "
                                                 "(supervised; labelled) or the masked reconstruction loss (mae).")
@click.option("--holdout", default=_P.holdout, type=P.FRACTION,
              help="Without --eval-data: hold this fraction of --data out (drawn from --seed) and evaluate on it.")
@click.option("--eval-every", default=_P.eval_every, type=P.EPOCHS,
              help="Epochs between evaluations on the held-out split (always after the last).")
@click.option("--recipe", default=None, callback=P.recipe_callback,
              help="Augmentation in train's recipe grammar (see `precompute --help`), e.g. "
                   "'rrc(scale=(0.35,1.0))|flip|randaug|normalize|erase' [default: a batched random resized crop "
                   "(scale 0.2-1 for mae, 0.35-1 for supervised) and flip].")
@click.option("--seed", default=_P.seed, type=P.SEED, help="Seed of the init, the order, the crops and the masks.")
@click.option("--threads", default=default_threads(), type=P.THREADS, help="Torch intra-op threads.")
@click.option("--device", default=_P.device, help="Device: cpu, cuda, cuda:1 ... (crops and masks are drawn on "
                                                   "the CPU generator either way).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def pretrain(method, data, out, model, model_args, epochs, batch_size, lr, warmup_epochs, weight_decay, clip_grad,
             model_ema_decay, mask_ratio, decoder_dim, decoder_depth, smoothing, num_classes, eval_data, holdout, eval_every, recipe, seed, threads, device, quiet,
             as_json):
    """Pre-train a teacher ViT and write a teacher directory (config.json + model.safetensors).

    `precompute --teacher OUT`, `train --teacher OUT --mode finetune` and `bench fidelity OUT` then
    load it like any other teacher. Same arguments, same weights.
    """
    from attncache.pipeline.studies.pretrain import TINY_VIT, Mae, PretrainConfig, Supervised
    from attncache.pipeline.studies.pretrain import pretrain as run_pretrain
    from attncache.pipeline.teacher.model import parse_model_args
    from attncache.pipeline.train.optim import OptimConfig

    base = PretrainConfig(data=(), out="")
    strategy = (Mae(mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth) if method == "mae"
                else Supervised(smoothing=smoothing))
    args = parse_model_args(model_args) if model_args else (TINY_VIT if model == base.model else ())
    optim = OptimConfig(lr=lr, min_lr=base.optim.min_lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        betas=base.optim.betas, clip_grad=clip_grad, model_ema_decay=model_ema_decay)
    config = PretrainConfig(data=tuple(data), out=out, method=strategy, model=model, model_args=args, epochs=epochs,
                            batch_size=batch_size, optim=optim, num_classes=num_classes, eval_data=tuple(eval_data),
                            holdout=holdout, eval_every=eval_every, recipe=recipe, seed=seed, threads=threads, device=device, progress=not quiet)
    result = run_pretrain(config)
    summary = {"out": result.out, "method": method, "epochs": result.epochs, "steps": result.steps,
               "seconds": round(result.seconds, 1), "final_loss": result.final_loss, "images": result.images,
               "skipped": result.skipped, "eval_top1": result.eval_top1,
               "history": list(result.history)}
    if model_ema_decay is not None:
        summary["eval_top1_ema"] = result.eval_top1_ema
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"pre-trained {method} teacher: {result.steps} steps on {result.images} images in "
               f"{result.seconds:.1f} s, final loss {result.final_loss:.4f} -> {out}")
    if result.skipped:
        click.echo(f"  skipped {result.skipped} bad samples (listed with reasons in {out}/pretrain.json)")
    evaluated = [h for h in result.history if "val_top1" in h or "val_loss" in h]
    if evaluated and result.eval_top1 is None:
        click.echo(f"  held-out reconstruction loss {evaluated[0]['val_loss']:.4f} (epoch {evaluated[0]['epoch'] + 1}) -> "
                   f"{evaluated[-1]['val_loss']:.4f} (epoch {evaluated[-1]['epoch'] + 1}); per epoch in {out}/pretrain.json")
    if result.eval_top1 is not None:
        click.echo(f"  held-out top-1 {result.eval_top1:.2f}" + (f", EMA {result.eval_top1_ema:.2f}"
                                                             if result.eval_top1_ema is not None else ""))

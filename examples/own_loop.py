"""Attention distillation from an attncache store in a plain PyTorch loop: your model, your optimiser.

    python examples/own_loop.py --cache CACHE.zarr --data 'DIR/train-{000000..000002}.tar' \
        --model-arg depth=3 --model-arg embed_dim=48 --model-arg img_size=32 --model-arg num_heads=3 \
        --model-arg patch_size=8 --steps 20

The student is any timm ViT whose tokens and heads match the cache's teacher (checked before the
first step). Each batch holds the replayed images, soft targets and the teacher's encoded factors;
`CacheSignal` decodes them to attention logits on the device, and the hooks installed into the
chosen blocks record the student's attention for the distillation loss.
"""
import argparse

import timm
import torch
import torch.nn.functional as F

from attncache.pipeline import (CacheSignal, Geometry, SignalGeometry, cache_stream, check_fit, epoch_loader,
                                get_mode, infer_num_classes, install_transfer, open_checked, transfer_loss)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--data", required=True, help="the shards the cache was made from")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--model-arg", action="append", default=[], help="KEY=INT, passed to timm.create_model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = 0, 1  # under torchrun: torch.distributed.get_rank(), get_world_size()

    store = open_checked(args.cache, "cache")  # refuses an unfinished or damaged cache before any step
    num_classes = infer_num_classes((args.data,), args.cache)  # classes.json beside the shards, else the labels
    model_args = {k: int(v) for k, v in (a.split("=", 1) for a in args.model_arg)}
    model = timm.create_model(args.model, num_classes=num_classes, **model_args).to(device)

    mode = get_mode("distill")  # or "copy": the teacher's attention replaces the student's
    layers = tuple(store.meta["layers"])  # student block i learns from teacher block i
    check_fit(Geometry.of(model), SignalGeometry.of_store(store.meta), mode.strategy, layers)
    context = install_transfer(model, layers, mode.strategy)
    signal = CacheSignal(store.meta, layers, mode.strategy.signal)
    stream = cache_stream(store, (args.data,), num_classes, seed=0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, epoch = 0, 0
    while step < args.steps:
        for batch in epoch_loader(stream, epoch, args.batch_size, workers=0, rank=rank, world=world):
            context.set_teacher(signal(batch, device))  # teacher logits of each transferred layer
            logits = model(batch["image"].to(device))
            ce = torch.sum(-batch["target"].to(device) * F.log_softmax(logits, dim=-1), dim=-1).mean()
            distill = transfer_loss(mode.strategy, context)
            loss = ce + args.distill_weight * distill
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            print(f"step {step} epoch {epoch} loss {loss.item():.4f} ce {ce.item():.4f} distill {distill.item():.4f}")
            if step == args.steps:
                break
        epoch += 1


if __name__ == "__main__":
    main()

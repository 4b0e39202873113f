"""Optimiser, schedule and EMA on timm's pieces give the numbers of the hand-written code they replaced.

The pins below were computed by the hand-written code (attncache 0b09c8e: optim.build_optimizer,
lr_at/set_lr, WeightEma as plain tensors) on the same few steps of the tiny student; the
library-based code must give them bit for bit (same run, same weights, before and after)."""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from attncache.pipeline.train.optim import OptimConfig, WarmupCosine, WeightEma, build_optimizer
from attncache.pipeline.train.student import StudentConfig, build_student
from attncache.pipeline.train.update import Updater

from tests.assets.machine_pins import check

ARGS = (("depth", 4), ("embed_dim", 64), ("img_size", 32), ("num_heads", 4), ("patch_size", 8))
NO_DECAY = {"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight", "norm.bias", "head.bias"} | {
    f"blocks.{i}.{n}" for i in range(4) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                  "attn.qkv.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")}
# (group index, lr_scale, weight_decay, parameter name) of every parameter, in optimiser order, hashed
GROUP_ORDER = {0.75: ("4355fd48381f1cb7b6ea1143c00423d32984e88fa0052929d7205c2ab4ddee66", 12),
               None: ("e6a9ed66db64b494a997e294ef2993ee72af59cf025d06f127ff10d7d8f0b228", 2)}
LRS = ["0x0.0p+0", "0x1.5d867c3ece2a5p-11", "0x1.5d867c3ece2a5p-10", "0x1.0624dd2f1a9fcp-9", "0x1.da7928a158af9p-10",
       "0x1.580e7fb6127b0p-10", "0x1.6db4a2b27e635p-11", "0x1.a37d436fc7e87p-13"]
PINS = {  # layer_decay, clip_grad, model_ema_decay -> sha256 of the final weights, of the EMA
    (0.75, 0.5, 0.9): ("8d01d01213efff1a376de62ee90b88a6f977717c47a2bb7709b5cd15ad819d86",
                       "1c62290e7fa796401d59046ded2b3c50b22d368ab26b0e8d6aeec23ee6421188"),
    (None, None, None): ("fd14783e0452d1c1f0217bd45bea34ab0eba80a3c1568784cf10ec4480a715fd", None),
}


def _student():
    return build_student(StudentConfig("vit_tiny_patch16_224", ARGS, num_classes=4, drop_path=0.1, seed=0))


def _digest(state):
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _paper_lr(step, total, warmup, cfg):
    """The hand-written schedule of 0b09c8e (the MAE paper's util/lr_sched.py), verbatim."""
    if step < warmup:
        return cfg.lr * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("layer_decay", [0.75, None])
def test_parameter_groups_are_the_hand_written_ones(layer_decay):
    model = _student()
    optimizer = build_optimizer(model, OptimConfig(layer_decay=layer_decay))
    names = {id(p): n for n, p in model.named_parameters()}
    rows = [(i, g["lr_scale"], g["weight_decay"], names[id(p)]) for i, g in enumerate(optimizer.param_groups)
            for p in g["params"]]
    text = "\n".join(f"{i} {s!r} {wd!r} {n}" for i, s, wd, n in rows)
    assert (hashlib.sha256(text.encode()).hexdigest(), len(optimizer.param_groups)) == GROUP_ORDER[layer_decay]
    assert {n for _, _, wd, n in rows if wd == 0.0} == NO_DECAY and {wd for *_, wd, _ in rows} == {0.0, 0.05}
    scales = {n: s for _, s, _, n in rows}
    if layer_decay is None:
        assert set(scales.values()) == {1.0}
    else:  # embeddings at 0.75^5, block i at 0.75^(4-i), the final norm with the last block, the head at 1
        assert scales["pos_embed"] == scales["patch_embed.proj.weight"] == 0.75 ** 5
        assert [scales[f"blocks.{i}.attn.qkv.weight"] for i in range(4)] == [0.75 ** (4 - i) for i in range(4)]
        assert scales["norm.weight"] == 0.75 and scales["head.weight"] == 1.0


@pytest.mark.parametrize("settings", list(PINS))
def test_a_few_steps_give_the_pinned_lrs_weights_and_ema(settings):
    layer_decay, clip, ema_decay = settings
    torch.set_num_threads(2)
    model = _student()
    cfg = OptimConfig(lr=2e-3, min_lr=1e-5, weight_decay=0.05, layer_decay=layer_decay, clip_grad=clip,
                      model_ema_decay=ema_decay)
    updater = Updater.build(model, cfg, total_steps=8, warmup_steps=3)
    gen = torch.Generator().manual_seed(0)
    lrs, group_lrs = [], []
    model.train()
    for step in range(8):
        x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        torch.manual_seed(step)  # drop path
        lr, _ = updater.step(step, lambda: F.cross_entropy(model(x), y), lambda loss: None)
        lrs.append(float.hex(lr))
        group_lrs.append([(g["lr"], lr * g["lr_scale"]) for g in updater.optimizer.param_groups])
    assert lrs == LRS
    assert all(have == want for step in group_lrs for have, want in step)  # every group at lr x its lr_scale
    check(f"optim/{settings}", [_digest(model.state_dict()),
                                _digest(updater.ema.state) if updater.ema is not None else None], list(PINS[settings]))


@pytest.mark.parametrize("lr,min_lr", [(1e-3, 1e-6), (2e-3, 1e-5), (1.5e-3, 0.0)])
def test_the_schedule_is_the_papers_bit_for_bit_where_timms_own_formula_is_not(lr, min_lr):
    cfg = OptimConfig(lr=lr, min_lr=min_lr)
    timm_differs = 0
    for total, warmup in [(1, 0), (2, 2), (5, 9), (40, 0), (40, 7), (97, 13), (300, 45)]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        optimizer.param_groups[0]["lr_scale"] = 1.0
        schedule = WarmupCosine(optimizer, cfg, total, warmup)
        assert "initial_lr" not in optimizer.param_groups[0]  # checkpoints' param groups as before
        for step in range(total):
            schedule.step_update(step)
            assert schedule.lr_at(step) == optimizer.param_groups[0]["lr"] == _paper_lr(step, total, warmup, cfg)
        timm_differs += sum(CosineLRScheduler._get_lr(schedule, t)[0] != _paper_lr(t, total, warmup, cfg)
                            for t in range(total))
    assert timm_differs > 0  # why WarmupCosine writes the formulas: timm's round differently


def test_ema_state_loads_back_and_refuses_other_tensors():
    model = _student()
    ema = WeightEma(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    saved = {k: v.clone() for k, v in ema.state.items()}
    other = WeightEma(_student(), 0.5)
    other.state = saved
    assert all(torch.equal(other.state[k], saved[k]) for k in saved) and set(other.state) == set(saved)
    assert not torch.equal(other.state["head.weight"], model.state_dict()["head.weight"])
    with pytest.raises(KeyError, match="pos_embed"):
        other.state = {k: v for k, v in saved.items() if k != "pos_embed"}

"""Student strategies: the paper's distill loss, parity of cache and online teacher, refusals before work."""
import numpy as np
import pytest
import timm
import torch

from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.teacher.model import TeacherConfig, TeacherError
from attncache.pipeline.train.loader import epoch_loader
from attncache.pipeline.train.loop import step_losses
from attncache.pipeline.train.session import TransferSpec, build_session, train_stream
from attncache.pipeline.train.signals import CacheSignal, OnlineSignal
from attncache.pipeline.train.student import (MODES, Copy, Signal, StudentConfig, StudentMismatch, TransferAttention,
    attention_ce, build_student, install_transfer, transfer_loss)

from conftest import TINY_TEACHER

ARGS = tuple(sorted(TINY_TEACHER["model_args"].items()))
STUDENT_ARGS = tuple((k, v) for k, v in ARGS if k != "num_classes")


def _student(mode="distill", layers=None, cache=None, teacher=None, **student_kw):
    args = dict(STUDENT_ARGS, **student_kw)
    return TransferSpec(StudentConfig(TINY_TEACHER["model"], tuple(sorted(args.items())), 4, 0.0, 1), mode, layers,
                        cache, teacher)


def _teacher_cfg(teacher_dir):
    return TeacherConfig(str(teacher_dir))


@pytest.fixture(scope="module")
def exact_cache(synth_data, trained_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "c.zarr"
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(out), teacher=_teacher_cfg(trained_teacher_dir),
                                    views=1, encoding="exact:fp32", layers=":", batch_size=32, workers=0, threads=2,
                                    progress=False))
    return out


@pytest.fixture(scope="module")
def lowrank_cache(synth_data, trained_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lowrank") / "c.zarr"
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(out), teacher=_teacher_cfg(trained_teacher_dir),
                                    views=1, encoding="lowrank:r=8:int8", layers="0:2", batch_size=32, workers=0, threads=2,
                                    progress=False))
    return out


def _first_batch(session, data, n=16):
    stream = train_stream(session, (data,), 0, 4, 0.0, 0)
    return next(iter(epoch_loader(stream, 0, n, 0)))


def test_distill_loss_matches_a_hand_written_reference():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 5, 5, generator=gen) * 3
    s = torch.randn(2, 3, 5, 5, generator=gen) * 3
    total = 0.0
    for b in range(2):
        for h in range(3):
            for i in range(5):
                p = [float(x) for x in torch.softmax(t[b, h, i], 0)]
                log_q = [float(x) for x in torch.log_softmax(s[b, h, i], 0)]
                total += -sum(pj * lj for pj, lj in zip(p, log_q))  # CE summed over keys
    reference = total / (2 * 3 * 5)  # mean over batch, heads, queries
    assert attention_ce(t, s).item() == pytest.approx(reference, rel=1e-6)
    # summed over layers
    strategy = MODES["distill"].strategy
    model = build_student(StudentConfig(TINY_TEACHER["model"], STUDENT_ARGS, 4))
    context = install_transfer(model, (0, 1), strategy)
    context.teacher, context.records = [t, s * 0.5], [s, t]
    expected = attention_ce(t, s) + attention_ce(s * 0.5, t)
    assert torch.allclose(transfer_loss(strategy, context), expected)


def test_transfer_attention_keeps_timm_state_dict_and_output():
    """Wrapping reuses the weights: keys are timm's and, with the student's own attention, the
    output equals the unwrapped model's."""
    plain = build_student(StudentConfig(TINY_TEACHER["model"], STUDENT_ARGS, 4, seed=3))
    wrapped = build_student(StudentConfig(TINY_TEACHER["model"], STUDENT_ARGS, 4, seed=3))
    context = install_transfer(wrapped, (0, 2), MODES["distill"].strategy)
    assert isinstance(wrapped.blocks[0].attn, TransferAttention) and not isinstance(wrapped.blocks[1].attn, TransferAttention)
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain.eval(), wrapped.eval()
    context.set_teacher(None)
    assert torch.allclose(plain(x), wrapped(x), atol=1e-5)
    assert all(r is not None for r in context.records)


@pytest.mark.parametrize("mode", ["distill", "distill_q", "distill_k"])
def test_distill_loss_and_gradients_from_exact_cache_equal_online_teacher(mode, synth_data, trained_teacher_dir,
                                                                          exact_cache):
    cached = build_session(_student(mode, cache=str(exact_cache)), "cpu")
    online = build_session(_student(mode, teacher=_teacher_cfg(trained_teacher_dir)), "cpu")
    assert isinstance(cached.signal, CacheSignal) and isinstance(online.signal, OnlineSignal)
    online.model.load_state_dict(cached.model.state_dict())
    batch = _first_batch(cached, synth_data["val"])
    results = []
    for session in (cached, online):
        session.model.zero_grad()
        total, ce, transfer = step_losses(session, batch, "cpu", 3.0, None)
        total.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in session.model.parameters() if p.grad is not None])
        results.append((transfer.detach(), total.detach(), grads))
    (t_c, l_c, g_c), (t_o, l_o, g_o) = results
    assert transfer_rel(t_c, t_o) < 1e-5 and transfer_rel(l_c, l_o) < 1e-5
    assert (g_c - g_o).norm() / g_o.norm() < 1e-5
    assert t_c > 0


def transfer_rel(a, b):
    return float((a - b).abs() / b.abs().clamp_min(1e-12))


@pytest.mark.parametrize("mode", ["copy", "copy_q", "copy_k"])
def test_copy_mode_logits_from_exact_cache_equal_online_teacher(mode, synth_data, trained_teacher_dir, exact_cache):
    cached = build_session(_student(mode, cache=str(exact_cache)), "cpu")
    online = build_session(_student(mode, teacher=_teacher_cfg(trained_teacher_dir)), "cpu")
    online.model.load_state_dict(cached.model.state_dict())
    batch = _first_batch(cached, synth_data["val"])
    outs = []
    for session in (cached, online):
        session.model.eval()
        session.context.set_teacher(session.signal(batch, "cpu"))
        outs.append(session.model(batch["image"]))
    assert (outs[0] - outs[1]).norm() / outs[1].norm() < 1e-5


def test_copy_uses_the_teachers_map_and_ignores_student_qk(synth_data, exact_cache):
    session = build_session(_student("copy", cache=str(exact_cache), layers="0:4"), "cpu")
    batch = _first_batch(session, synth_data["val"], n=4)
    session.model.eval()
    session.context.set_teacher(session.signal(batch, "cpu"))
    before = session.model(batch["image"])
    with torch.no_grad():  # student Q/K weights do not matter where the map is copied
        for block in session.model.blocks:
            block.attn.qkv.weight[:128] += 1.0
    session.context.set_teacher(session.signal(batch, "cpu"))
    assert torch.allclose(before, session.model(batch["image"]), atol=1e-6)


def test_copy_without_a_teacher_signal_fails_loudly():
    model = build_student(StudentConfig(TINY_TEACHER["model"], STUDENT_ARGS, 4))
    context = install_transfer(model, (0,), Copy())
    context.set_teacher(None)
    with pytest.raises(RuntimeError, match="no teacher signal"):
        model(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("override, message", [
    ({"patch_size": 4}, "tokens: student 65"),
    ({"num_heads": 2}, "heads: student 2"),
    ({"img_size": 48}, "image size: student 48"),
    ({"class_token": False, "global_pool": "avg"}, "prefix tokens: student 0"),
    ({"reg_tokens": 2}, "prefix tokens: student 3"),
])
def test_student_that_does_not_fit_the_store_is_refused_naming_both_values(override, message, exact_cache):
    with pytest.raises(StudentMismatch, match=message):
        build_session(_student("distill", cache=str(exact_cache), **override), "cpu")


def test_layers_beyond_the_store_and_student_are_refused(exact_cache, lowrank_cache):
    with pytest.raises(TeacherError, match="exist in a model with 2 layers"):
        build_session(_student("distill", cache=str(exact_cache), layers="0,3", depth=2), "cpu")
    with pytest.raises(StudentMismatch, match=r"layers \[2\] are not in the cache .*it has \[0, 1\]"):
        build_session(_student("distill", cache=str(lowrank_cache), layers="1,2"), "cpu")


def test_copy_q_on_a_lowrank_store_is_refused(lowrank_cache):
    with pytest.raises(StudentMismatch, match="copy_q needs teacher Q/K.*lowrank"):
        build_session(_student("copy_q", cache=str(lowrank_cache)), "cpu")
    build_session(_student("distill", cache=str(lowrank_cache)), "cpu")  # logit modes are served


def test_layers_option_selects_the_transferred_layers(exact_cache, synth_data):
    default = build_session(_student("distill", cache=str(exact_cache)), "cpu")
    chosen = build_session(_student("distill", cache=str(exact_cache), layers="1,3"), "cpu")
    assert default.layers == (0,)  # 4 layers: all but the last 3
    assert chosen.layers == (1, 3)
    wrapped = [i for i, b in enumerate(chosen.model.blocks) if isinstance(b.attn, TransferAttention)]
    assert wrapped == [1, 3]
    batch = _first_batch(chosen, synth_data["val"], n=8)
    _, _, t_default = step_losses(default, batch, "cpu", 3.0, None)
    _, _, t_chosen = step_losses(chosen, batch, "cpu", 3.0, None)
    assert not torch.isclose(t_default, t_chosen)


def test_distill_weight_scales_the_transfer_term(exact_cache, synth_data):
    session = build_session(_student("distill", cache=str(exact_cache)), "cpu")
    batch = _first_batch(session, synth_data["val"], n=8)
    total1, ce, transfer = step_losses(session, batch, "cpu", 1.0, None)
    total5, _, _ = step_losses(session, batch, "cpu", 5.0, None)
    assert torch.isclose(total1, ce + transfer) and torch.isclose(total5, ce + 5.0 * transfer)


def test_every_mode_builds_its_strategy(exact_cache, trained_teacher_dir):
    for name, mode in MODES.items():
        spec = _student(name, cache=None if mode.strategy.signal is Signal.NONE else str(exact_cache),
                        teacher=_teacher_cfg(trained_teacher_dir))
        session = build_session(spec, "cpu")
        wrapped = [b.attn.strategy for b in session.model.blocks if isinstance(b.attn, TransferAttention)]
        assert all(s is mode.strategy for s in wrapped)
        assert bool(wrapped) == (mode.strategy.signal is not Signal.NONE)


def test_finetune_starts_from_the_teacher_weights(trained_teacher_dir):
    from safetensors.torch import load_file

    session = build_session(_student("finetune", teacher=_teacher_cfg(trained_teacher_dir)), "cpu")
    teacher = load_file(str(trained_teacher_dir / "model.safetensors"))
    student = session.model.state_dict()
    assert torch.equal(student["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    scratch = build_session(_student("scratch"), "cpu").model.state_dict()
    assert not torch.equal(scratch["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])


def test_decoded_logits_are_batched_tensors_on_the_device(exact_cache, synth_data):
    session = build_session(_student("distill", cache=str(exact_cache), layers="0,2"), "cpu")
    batch = _first_batch(session, synth_data["val"], n=8)
    assert isinstance(batch["factors"]["q"], torch.Tensor) and batch["factors"]["q"].shape[:2] == (8, 4)
    signals = session.signal(batch, "cpu")
    assert len(signals) == 2 and signals[0].shape == (8, 4, 17, 17)
    q = batch["factors"]["q"][:, 2].float()
    k = batch["factors"]["k"][:, 2].float()
    scale = float(timm.create_model(TINY_TEACHER["model"], **TINY_TEACHER["model_args"]).blocks[0].attn.scale)
    assert torch.allclose(signals[1], (q * scale) @ k.transpose(-1, -2))
    assert np.isfinite(signals[0].numpy()).all()

"""Q/K modes from every encoding that claims to serve them: cache vs online teacher, within the bound
that the encoding's own quantisation gives, and refusal (fit check and `plan`) for the rest.

The store is made with a layer subset and a reordered head set (`--layers 1:4 --heads 3,1,0,2`) and
the student transfers a subset of those layers (and, for distill_*, of the heads), so the decode
must pick the right slots of both axes, not only the right arithmetic.

Bounds per element, derived from the encoding (`pipeline/encodings/scaled.py` header), where x is the
online teacher's value and m the max |x| of its (layer, head, token) row:
- fp32: capture noise only (the same teacher at another batch size): 1e-6 m;
- fp16 / bf16: round to nearest, unit roundoff u = 2^-11 / 2^-8: u |x| (plus the noise);
- int8 / int4: v = round(x / s), s = fp16(m / qmax) <= (m / qmax)(1 + 2^-11), and m / s stays below
  qmax + 1/2, so nothing clips: |x - v s| <= s / 2 <= m (1 + 2^-11) / (2 qmax), qmax = 127 / 7;
- fp8 e4m3 on x / s with s = fp16(m / 448): 3 mantissa bits, u = 2^-4 on normals, half the
  subnormal spacing 2^-10 below 2^-6: |error| <= 2^-4 |x| + 2^-10 s.
Each bound must also be nearly reached (max error / bound > 1/2), so a decode that is right only
because the bound is loose fails too.
"""
import json

import pytest
import torch
from click.testing import CliRunner

from attncache.cli.main import cli
from attncache.pipeline.encodings.codecs import QUANTS
from attncache.pipeline.encodings.protocol import CannotDecode
from attncache.pipeline.encodings.spec import parse_encoding
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.teacher.model import TeacherConfig
from attncache.pipeline.train.loader import epoch_loader
from attncache.pipeline.train.loop import step_losses
from attncache.pipeline.train.session import TransferSpec, build_session, train_stream
from attncache.pipeline.train.signals import CacheSignal, OnlineSignal
from attncache.pipeline.train.student import StudentConfig, StudentMismatch

from conftest import TINY_TEACHER

ARGS = tuple(sorted(TINY_TEACHER["model_args"].items()))
STUDENT_ARGS = tuple((k, v) for k, v in ARGS if k != "num_classes")
STORE_LAYERS, STORE_HEADS = "1:4", "3,1,0,2"
NOISE = 1e-6  # relative to the row max: fp32 capture at another batch size
FP16_SCALE = 1 + 2.0 ** -11  # a per-row scale is rounded to float16 before use


def _bound(spec: str, x: torch.Tensor) -> torch.Tensor:
    """Largest |decoded - x| the encoding allows per element (see the module docstring)."""
    m = x.abs().amax(dim=-1, keepdim=True)
    kind = spec.split(":")[1]
    if kind == "fp32":
        extra = 0.0
    elif kind in ("fp16", "bf16"):
        extra = (2.0 ** -11 if kind == "fp16" else 2.0 ** -8) * x.abs()
    elif kind in ("int8", "int4"):
        extra = m * FP16_SCALE / (2 * {"int8": 127, "int4": 7}[kind])
    elif kind == "fp8":
        extra = 2.0 ** -4 * x.abs() + 2.0 ** -10 * m * FP16_SCALE / 448
    else:
        raise AssertionError(f"no derived bound for {spec}: add one before it claims to serve Q/K")
    return extra + NOISE * m + 1e-12


def _all_specs() -> list[str]:
    return [f"exact:{q}" for q in QUANTS] + [f"lowrank:r={r}:{q}" for r in ("8", "4,8,8") for q in QUANTS]


QK_SPECS = [s for s in _all_specs() if parse_encoding(s).serves_qk]
LOGIT_ONLY_SPECS = [s for s in _all_specs() if not parse_encoding(s).serves_qk]


def test_every_exact_encoding_serves_qk_and_no_lowrank_one_does():
    assert QK_SPECS == [f"exact:{q}" for q in QUANTS]
    assert LOGIT_ONLY_SPECS and all(s.startswith("lowrank") for s in LOGIT_ONLY_SPECS)
    for spec in QK_SPECS:
        _bound(spec, torch.ones(1, 2))  # every Q/K-serving encoding has a derived bound


@pytest.fixture(scope="module")
def qk_caches(synth_data, trained_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qk")
    caches = {}
    for spec in QK_SPECS:
        out = root / f"{spec.replace(':', '_')}.zarr"
        run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(out),
                                        teacher=TeacherConfig(str(trained_teacher_dir)), views=1, encoding=spec,
                                        layers=STORE_LAYERS, heads=STORE_HEADS, batch_size=32, workers=0,
                                        threads=2, progress=False))
        caches[spec] = out
    return caches


def _spec(mode, **kw):
    student = StudentConfig(TINY_TEACHER["model"], STUDENT_ARGS, 4, 0.0, 1)
    return TransferSpec(student, mode, **kw)


def _sessions(mode, cache, teacher_dir, layers, heads):
    cached = build_session(_spec(mode, layers=layers, cache=str(cache), heads=heads), "cpu")
    online = build_session(_spec(mode, layers=layers, teacher=TeacherConfig(str(teacher_dir)), heads=heads), "cpu")
    assert isinstance(cached.signal, CacheSignal) and isinstance(online.signal, OnlineSignal)
    online.model.load_state_dict(cached.model.state_dict())
    return cached, online


def _batch(session, data, n=16):
    return next(iter(epoch_loader(train_stream(session, (data,), 0, 4, 0.0, 0), 0, n, 0)))


class Quantised:
    """The online teacher's signal passed through the encoding (encode, then the encoding's decode):
    what the cache should hand the student, up to the fp32 capture noise."""

    def __init__(self, online: OnlineSignal, spec: str):
        self.online, self.encoding = online, parse_encoding(spec)

    def __call__(self, batch, device):
        teacher = self.online.teacher
        q, k = teacher.capture(batch["image"], self.online.layers, self.online.heads)
        arrays = self.encoding.encode(q, k, teacher.scale)
        out = self.encoding.decode(arrays, self.online.signal.value, teacher.scale, device)
        return [t.clone() for t in out.unbind(1)]


def _student_outputs(session, batch, mode):
    """Copy modes: the student's logits with the teacher signal in place. Distill modes: the total
    and transfer loss of one step, and the gradient."""
    if mode.startswith("copy"):
        session.model.eval()
        session.context.set_teacher(session.signal(batch, "cpu"))
        with torch.no_grad():
            return [session.model(batch["image"])]
    session.model.zero_grad()
    total, _, transfer = step_losses(session, batch, "cpu", 3.0, None)
    total.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in session.model.parameters() if p.grad is not None])
    return [total.detach(), transfer.detach(), grads]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("mode", ["copy_q", "copy_k", "distill_q", "distill_k"])
@pytest.mark.parametrize("spec", QK_SPECS)
def test_teacher_qk_from_the_cache_equals_the_online_teacher_within_the_encoding_bound(
        spec, mode, qk_caches, synth_data, trained_teacher_dir):
    heads = "2,0" if mode.startswith("distill") else None  # copy modes refuse a head subset
    cached, online = _sessions(mode, qk_caches[spec], trained_teacher_dir, "2:4", heads)
    batch = _batch(cached, synth_data["val"])
    got, want = cached.signal(batch, "cpu"), online.signal(batch, "cpu")
    assert len(got) == len(want) == 2
    ratios = []
    for g, w in zip(got, want):
        assert g.shape == w.shape == (16, 2 if heads else 4, 17, 16) and g.dtype == torch.float32
        ratios.append(float(((g - w).abs() / _bound(spec, w)).max()))
    worst = max(ratios)
    assert worst <= 1.0, f"{spec} {mode}: error reaches {worst:.3g} x the encoding's bound"
    if spec != "exact:fp32":
        assert worst > 0.5, f"{spec} {mode}: error only {worst:.3g} x the bound: is the bound derived?"

    # the student's logits (copy) or loss and gradient (distill) on this batch: the same as with the
    # online teacher's signal through the encoding (and, at fp32, as with the online teacher itself)
    reference = build_session(_spec(mode, layers="2:4", teacher=TeacherConfig(str(trained_teacher_dir)),
                                    heads=heads), "cpu")
    reference.model.load_state_dict(cached.model.state_dict())
    reference.signal = Quantised(online.signal, spec)
    for c, r in zip(_student_outputs(cached, batch, mode), _student_outputs(reference, batch, mode)):
        assert _rel(c, r) < 1e-5, f"{spec} {mode}: student output differs by {_rel(c, r):.3g}"
    if spec == "exact:fp32":
        for c, o in zip(_student_outputs(cached, batch, mode), _student_outputs(online, batch, mode)):
            assert _rel(c, o) < 1e-5


def test_copy_modes_take_student_head_h_from_teacher_head_h_in_a_reordered_store(
        qk_caches, synth_data, trained_teacher_dir):
    """The store holds heads 3,1,0,2 in that order; head h of the signal must be teacher head h."""
    cached, online = _sessions("copy_q", qk_caches["exact:fp32"], trained_teacher_dir, "1:4", None)
    batch = _batch(cached, synth_data["val"], n=4)
    for g, w in zip(cached.signal(batch, "cpu"), online.signal(batch, "cpu")):
        torch.testing.assert_close(g, w, rtol=0, atol=NOISE * float(w.abs().max()))


def test_a_store_missing_a_head_the_student_transfers_is_refused(synth_data, trained_teacher_dir, tmp_path):
    out = tmp_path / "sub.zarr"
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(out),
                                    teacher=TeacherConfig(str(trained_teacher_dir)), views=1, encoding="exact:fp16",
                                    layers="0:2", heads="0,2", batch_size=32, workers=0, threads=2, progress=False))
    with pytest.raises(StudentMismatch, match=r"heads \[1, 3\] are not in the cache \(exact:fp16.*it has heads \[0, 2\]"):
        build_session(_spec("copy_q", layers="0:2", cache=str(out)), "cpu")
    session = build_session(_spec("distill_q", layers="0:2", cache=str(out), heads="2,0"), "cpu")
    assert session.signal.heads.tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("spec", LOGIT_ONLY_SPECS)
def test_an_encoding_without_qk_cannot_decode_them_and_says_which(spec):
    encoding = parse_encoding(spec)
    assert "logits" in encoding.decodes and not {"q", "k"} & encoding.decodes
    for what in ("q", "k"):
        with pytest.raises(CannotDecode, match=f"encoding {spec} stores only logit factors.*cannot decode {what}"):
            encoding.decode({}, what, 1.0)


@pytest.fixture(scope="module")
def lowrank_store(synth_data, trained_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lr") / "c.zarr"
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(out),
                                    teacher=TeacherConfig(str(trained_teacher_dir)), views=1,
                                    encoding="lowrank:r=4,8,8:int4", layers=STORE_LAYERS, batch_size=32, workers=0,
                                    threads=2, progress=False))
    return out


@pytest.mark.parametrize("mode", ["copy_q", "copy_k", "distill_q", "distill_k"])
def test_train_refuses_qk_modes_from_a_logit_only_store_before_work(mode, lowrank_store):
    with pytest.raises(StudentMismatch) as info:
        build_session(_spec(mode, layers="2:4", cache=str(lowrank_store)), "cpu")
    text = str(info.value)
    assert "\n" not in text and f"mode {mode} needs teacher Q/K" in text
    assert "lowrank:r=4,8,8:int4" in text and "stores only logit factors" in text and "exact:int8" in text


TINY = ["--teacher", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
        "--model-arg", "depth=4", "--model-arg", "embed_dim=64", "--model-arg", "num_heads=4",
        "--samples", "10", "--images-per-s", "50", "--layers", STORE_LAYERS]


@pytest.mark.parametrize("mode", ["copy_q", "copy_k", "distill_q", "distill_k"])
def test_plan_serves_a_mode_exactly_when_the_encoding_decodes_its_signal(mode):
    for spec in LOGIT_ONLY_SPECS:
        result = CliRunner().invoke(cli, ["plan", *TINY, "--encoding", spec, "--mode", mode])
        assert result.exit_code == 2, (spec, result.output)
        line = [l for l in result.output.splitlines() if "cannot serve" in l]
        assert len(line) == 1 and f"encoding {spec} stores only logit factors" in line[0]
        assert f"cannot serve mode {mode}" in line[0] and "Traceback" not in result.output
    for spec in QK_SPECS:  # each of these has passed the parity test above
        result = CliRunner().invoke(cli, ["plan", *TINY, "--encoding", spec, "--mode", mode, "--json"])
        assert result.exit_code == 0, (spec, result.output)
        assert json.loads(result.stdout)["serves_qk"] is True

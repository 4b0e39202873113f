"""Encodings: exact round trips, low-rank algebra, and fidelity on a trained teacher's attention."""
import numpy as np
import pytest
import torch

from pipeline.factors import (ExactEncoding, LowRankEncoding, attention_kl, exact_logits, parse_encoding)

SCALE = 16 ** -0.5


def _qk(b=2, l=2, h=3, n=17, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, l, h, n, d, generator=g), torch.randn(b, l, h, n, d, generator=g) + 0.5


def test_exact_fp32_round_trip_is_lossless():
    q, k = _qk()
    enc = ExactEncoding("fp32")
    arrays = enc.encode(q, k, SCALE)
    assert np.array_equal(arrays["q"], q.numpy()) and np.array_equal(arrays["k"], k.numpy())
    assert torch.equal(enc.decode_logits(arrays, SCALE), exact_logits(q, k, SCALE))


@pytest.mark.parametrize("dtype,atol", [("fp16", 5e-3), ("bf16", 5e-2)])
def test_exact_half_precisions_round_trip_within_their_precision(dtype, atol):
    q, k = _qk()
    enc = ExactEncoding(dtype)
    arrays = enc.encode(q, k, SCALE)
    assert arrays["q"].dtype == (np.float16 if dtype == "fp16" else np.uint16)
    torch.testing.assert_close(enc.decode_logits(arrays, SCALE), exact_logits(q, k, SCALE), atol=atol * 8, rtol=atol)


def _row_centred(x):
    return x - x.mean(-1, keepdim=True)


def test_lowrank_at_full_rank_reproduces_logits_up_to_a_per_row_constant():
    q, k = _qk()
    enc = LowRankEncoding(rank=16, quant="fp32")
    est = enc.decode_logits(enc.encode(q, k, SCALE), SCALE)
    ref = exact_logits(q, k, SCALE)
    torch.testing.assert_close(_row_centred(est), _row_centred(ref), atol=1e-4, rtol=1e-4)
    assert float(attention_kl(ref, est).max()) < 1e-9
    assert (est - ref).std(-1).max() < 1e-4  # the difference is constant along each row


def test_lowrank_handles_fewer_tokens_than_the_rank():
    q, k = _qk(n=5, d=16)
    enc = LowRankEncoding(rank=8, quant="fp32")
    arrays = enc.encode(q, k, SCALE)
    assert arrays["a"].shape[-1] == 8 and np.isfinite(arrays["a"]).all() and np.isfinite(arrays["b"]).all()
    est = enc.decode_logits(arrays, SCALE)
    torch.testing.assert_close(_row_centred(est), _row_centred(exact_logits(q, k, SCALE)), atol=1e-4, rtol=1e-4)


def test_int8_stores_one_scale_per_token_and_head():
    q, k = _qk()
    arrays = LowRankEncoding(rank=8, quant="int8").encode(q, k, SCALE)
    assert arrays["a"].dtype == np.int8 and arrays["a"].shape == (2, 2, 3, 17, 8)
    assert arrays["a_scale"].shape == (2, 2, 3, 17) and arrays["a_scale"].dtype == np.float16
    assert np.abs(arrays["a"]).max(axis=-1).min() >= 126  # every row uses the full int8 range


def test_encoding_specs_parse_and_reject_nonsense():
    assert parse_encoding("exact:fp16") == ExactEncoding("fp16")
    assert parse_encoding("lowrank:r=16:int8") == LowRankEncoding(16, "int8")
    assert parse_encoding("lowrank:r=4") == LowRankEncoding(4, "fp16")
    for bad in ("", "exact:fp8", "lowrank", "lowrank:r=0", "lowrank:r=4:int3", "svd:r=4"):
        with pytest.raises(ValueError):
            parse_encoding(bad)
    assert parse_encoding("exact:fp16").serves_qk and not parse_encoding("lowrank:r=4").serves_qk


def test_rank_above_head_dim_is_refused():
    with pytest.raises(ValueError, match="head dim"):
        LowRankEncoding(rank=32).array_specs(2, 3, 17, 16)


@pytest.fixture(scope="module")
def trained_qk(trained_teacher_dir, synth_data):
    from conftest import load_split
    from pipeline.teacher import Teacher, TeacherConfig

    teacher = Teacher(TeacherConfig(str(trained_teacher_dir)))
    x, _ = load_split(synth_data["val"])
    q, k = teacher.capture(x[:16], tuple(range(teacher.num_layers)))
    return q, k, teacher.scale, x[:16]


def test_fidelity_on_trained_attention_gets_worse_monotonically_as_rank_drops(trained_qk):
    q, k, scale, trained_images = trained_qk
    ref = exact_logits(q, k, scale)
    kls = {}
    for r in (16, 12, 8, 4, 2, 1):
        enc = LowRankEncoding(rank=r, quant="fp32")
        kls[r] = float(attention_kl(ref, enc.decode_logits(enc.encode(q, k, scale), scale)).mean())
    ranks = sorted(kls, reverse=True)
    assert kls[16] < 1e-8
    assert all(kls[a] < kls[b] for a, b in zip(ranks, ranks[1:])), kls
    # training made the attention structured: a rank-1 fit loses far more than on random weights,
    # whose near-zero logits make every encoding look perfect
    from conftest import TINY_TEACHER
    from pipeline.teacher import Teacher, TeacherConfig

    random_teacher = Teacher(TeacherConfig(TINY_TEACHER["model"], tuple(sorted(TINY_TEACHER["model_args"].items())),
                                           random_init=True))
    qr, kr = random_teacher.capture(trained_images,
                                    tuple(range(random_teacher.num_layers)))
    enc = LowRankEncoding(rank=1, quant="fp32")
    kl_random = float(attention_kl(exact_logits(qr, kr, scale), enc.decode_logits(enc.encode(qr, kr, scale), scale)).mean())
    assert kls[1] > 10 * kl_random, (kls[1], kl_random)


def test_int8_costs_little_fidelity_on_trained_attention(trained_qk):
    q, k, scale, _ = trained_qk
    ref = exact_logits(q, k, scale)
    f32, i8 = LowRankEncoding(8, "fp32"), LowRankEncoding(8, "int8")
    kl32 = float(attention_kl(ref, f32.decode_logits(f32.encode(q, k, scale), scale)).mean())
    kl8 = float(attention_kl(ref, i8.decode_logits(i8.encode(q, k, scale), scale)).mean())
    assert kl8 < kl32 + 2e-3

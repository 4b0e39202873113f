"""The candidate low-rank fitter (`fit_subspace`, issue 18 item 2) against the float64 eigh every store
uses: fidelity per rank within a stated tolerance, bits fixed across runs and thread counts, and the
stores' fitter untouched (its default path is what tests/test_encoding_pins.py pins)."""
import pytest
import torch

from attncache.pipeline.encodings.fit import _top_singular, fit_factors
from attncache.benchmarks.fit_subspace import top_singular_subspace
from attncache.pipeline.encodings.kl import attention_kl, exact_logits
from attncache.pipeline.encodings.spec import parse_encoding

from attncache.benchmarks.fitter import low_rank_plus_noise

# measured (BENCHMARKS.md, "Low-rank fitter"): the subspace fit's KL is at most 0.2 % above the eigh's
KL_TOLERANCE = 1.01


def kl(q, k, scale, rank, top):
    a, b = fit_factors(q, k, scale, rank, top)
    return float(attention_kl(exact_logits(q, k, scale), a @ b.transpose(-1, -2)).mean())


@pytest.fixture(scope="module")
def noisy_qk():
    return low_rank_plus_noise(2, 2, 3, 33, 32, rank=6, noise=0.3)


@pytest.mark.parametrize("rank", [2, 4, 8, 32])
def test_subspace_kl_is_the_eighs_within_tolerance_on_low_rank_plus_noise(noisy_qk, rank):
    q, k = noisy_qk
    old, new = kl(q, k, 32 ** -0.5, rank, None), kl(q, k, 32 ** -0.5, rank, top_singular_subspace)
    assert new <= old * KL_TOLERANCE + 1e-12, (rank, old, new)


def test_subspace_kl_is_the_eighs_within_tolerance_on_trained_attention(trained_teacher_dir, synth_data):
    from conftest import load_split
    from attncache.pipeline.teacher.model import Teacher, TeacherConfig

    teacher = Teacher(TeacherConfig(str(trained_teacher_dir)))
    q, k = teacher.capture(load_split(synth_data["val"])[0][:8], tuple(range(teacher.num_layers)))
    for rank in (2, 4, 8, q.shape[-1]):  # d = 16: from r = 8 on the subspace fit is the eigh itself
        old, new = kl(q, k, teacher.scale, rank, None), kl(q, k, teacher.scale, rank, top_singular_subspace)
        assert new <= old * KL_TOLERANCE + 1e-12, (rank, old, new)


def fits_at(thread_counts, fit):
    """`fit()` once at each torch thread count, with the count seen right after each call; the
    caller's count is restored."""
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in thread_counts:
            torch.set_num_threads(threads)
            outs.append((fit(), torch.get_num_threads()))
        return outs
    finally:
        torch.set_num_threads(before)


def same_bits(outs) -> bool:
    return all(torch.equal(x, y) for (out, _) in outs[1:] for x, y in zip(outs[0][0], out))


def test_subspace_fit_is_bit_identical_across_runs_and_thread_counts(noisy_qk):
    q, k = noisy_qk
    assert same_bits(fits_at((2, 2, 1), lambda: fit_factors(q, k, 32 ** -0.5, 4, top_singular_subspace)))


def test_subspace_solves_the_top_pairs_of_a_core_with_a_clear_gap():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(3, 24, 24, generator=g, dtype=torch.float64))
    values = torch.cat([torch.tensor([9.0, 7.0, 5.0, 3.0]), torch.full((20,), 0.1)]).double()
    core = basis * values @ basis.transpose(-1, -2)
    (top, sing), (ref_top, ref_sing) = top_singular_subspace(core, 4), _top_singular(core, 4)
    assert torch.allclose(sing, ref_sing, atol=1e-10)
    assert torch.allclose((top * ref_top).sum(-2).abs(), torch.ones(3, 4, dtype=torch.float64), atol=1e-8)


def test_stores_keep_the_eigh_fitter():
    """The encoding calls `fit_factors` with its default: the subspace fit writes no store."""
    q, k = low_rank_plus_noise(1, 1, 2, 17, 16)
    a, b = parse_encoding("lowrank:r=4:fp32").factorize(q, k, 0.25)
    ref_a, ref_b = fit_factors(q, k, 0.25, 4, _top_singular)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


def test_the_stores_fitter_gives_the_same_bits_at_every_thread_count_and_gives_the_count_back(noisy_qk):
    """The d x d LAPACK work runs on one thread whatever the caller set (`one_cpu_thread`): the
    factors are the same bits at 1 and 2 threads, and the caller's count is back afterwards, also
    when the fit refuses a Gram matrix that overflowed float32."""
    from attncache.pipeline.encodings.finite import NonFiniteValues

    q, k = noisy_qk
    outs = fits_at((2, 1, 2), lambda: fit_factors(q, k, 32 ** -0.5, 4))
    assert [after for _, after in outs] == [2, 1, 2]
    assert same_bits(outs)

    def refused():
        with pytest.raises(NonFiniteValues):
            fit_factors(q * 1e30, k, 32 ** -0.5, 4)
    assert [after for _, after in fits_at((2,), refused)] == [2]

"""Growing a store's views (pipeline/store/grow.py): a 2-view store grown with `--views 4` equals a
4-view store made at once, byte for byte; only the new views' units are processed; a grow killed
anywhere resumes to the same bytes; another job's settings and shrinking are refused, bytes unchanged."""
import re
import signal

import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, run_cli, store_files


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The data, a 4-view store made at once, and the command line both share (less --views / --out)."""
    root = tmp_path_factory.mktemp("grow")
    data = noise_shards(root / "d", 24, shard_size=8, seed=3)
    common = ["precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none"]
    made = invoke(*common, "--views", "4", "--out", root / "four.zarr")
    assert made.exit_code == 0, made.output
    return root, common, store_files(root / "four.zarr")


def _grown(root, common, name):
    out = root / name
    first = invoke(*common, "--views", "2", "--out", out)
    assert first.exit_code == 0, first.output
    return out


def test_views_of_a_smaller_store_are_those_of_a_store_made_at_once(stores, tmp_path):
    """A unit's bytes do not depend on the view count: view 0..1 data files of a 2-view store are the
    4-view store's (the markers differ only in the metadata digest, which the grow rewrites)."""
    root, common, four = stores
    two = store_files(_grown(root, common, "two-only.zarr"))
    data = [r for r in two if r.startswith("views/") and "/c/" in r]
    assert data and all(two[r] == four[r] for r in data)


def test_grow_two_views_to_four_equals_four_at_once_and_processes_only_new_views(stores):
    root, common, four = stores
    out = _grown(root, common, "grown.zarr")
    grown = invoke(*[a for a in common if a != "--quiet"], "--views", "4", "--out", out)  # the summary printed
    assert grown.exit_code == 0, grown.output
    assert "units: 6 processed, 6 already done, 12 in the job" in grown.output, grown.output
    assert differing(four, store_files(out)) == []
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and "12/12 units ok" in verified.output, verified.output
    again = invoke(*[a for a in common if a != "--quiet"], "--views", "4", "--out", out)
    assert "units: 0 processed, 12 already done, 12 in the job" in again.output, again.output
    assert differing(four, store_files(out)) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["unit-done:1", "array-written:2:torn", "marker-tmp:4", "marker-tmp:7",
                                   "marker-renamed:10"])
def test_grow_killed_anywhere_resumes_to_the_same_bytes(stores, point):
    """Kills while the new views' 6 units are written (markers 1..6; the root still says 2 views, so
    readers see the old store whole), just after the root metadata says 4 views (marker-tmp:7: no old
    marker rewritten yet) and among the old markers' rewrites (7..12)."""
    root, common, four = stores
    out = _grown(root, common, f"killed-{point.replace(':', '-')}.zarr")
    killed = run_cli(*common, "--views", "4", "--out", out, fault=point)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    usable = invoke("verify", out)  # whatever the kill left, the store verifies as 2 or 4 views
    assert usable.exit_code == 0 and re.search(r"\b(6/6|12/12) units ok", usable.output), usable.output
    final = run_cli(*common, "--views", "4", "--out", out)
    assert final.returncode == 0, final.stdout + final.stderr
    assert differing(four, store_files(out)) == []


@pytest.mark.parametrize("change, field", [(["--seed", "1"], "seed"), (["--encoding", "lowrank:r=4:int8"], "encoding")])
def test_grow_with_other_settings_is_refused_in_one_line_and_changes_nothing(stores, change, field):
    root, common, _ = stores
    out = _grown(root, common, f"other-{field}.zarr")
    before = store_files(out)
    refused = invoke(*common, "--views", "4", *change, "--out", out)
    assert refused.exit_code != 0
    error = [line for line in refused.output.splitlines() if line.strip()]
    assert len(error) == 1 and "holds a different cache" in error[0] and f"{field}:" in error[0], refused.output
    assert differing(before, store_files(out)) == []


def test_shrinking_is_refused_in_one_line_and_changes_nothing(stores):
    root, common, _ = stores
    out = _grown(root, common, "shrink.zarr")
    before = store_files(out)
    refused = invoke(*common, "--views", "1", "--out", out)
    assert refused.exit_code != 0
    error = [line for line in refused.output.splitlines() if line.strip()]
    assert len(error) == 1 and "holds 2 views and --views 1 asks for fewer" in error[0], refused.output
    assert differing(before, store_files(out)) == []


def test_train_reads_the_grown_views_as_those_of_a_store_made_at_once(stores):
    """What train checks before its first step passes, and epochs 2 and 3 replay views 2 and 3 with the
    factors of the 4-view store made at once."""
    import numpy as np

    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.store.checks import quick_problems
    from attncache.pipeline.train.loader import cache_stream, read_unit_samples, view_of

    root, common, _ = stores
    out = _grown(root, common, "train.zarr")
    assert invoke(*common, "--views", "4", "--out", out).exit_code == 0
    data = (common[common.index("--data") + 1],)
    grown, at_once = CacheStore.open(out), CacheStore.open(root / "four.zarr")
    assert quick_problems(grown) == [] and grown.meta["views"] == 4
    for epoch in (2, 3):
        cfg_g, cfg_a = (cache_stream(s, data, num_classes=4, shuffle_buffer=0) for s in (grown, at_once))
        assert view_of(epoch, cfg_g.views) == epoch
        got = read_unit_samples(cfg_g, cfg_g.recipe, grown, 1, epoch).samples
        want = read_unit_samples(cfg_a, cfg_a.recipe, at_once, 1, epoch).samples
        assert [s.key for s in got] == [s.key for s in want] and len(got) == 8
        for g, w in zip(got, want):
            assert np.array_equal(g.image_CHW.numpy(), w.image_CHW.numpy())
            assert all(np.array_equal(g.factors[n], w.factors[n]) for n in w.factors)

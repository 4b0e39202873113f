"""Growing a store by new shards of the same data set (pipeline/store/grow.py): a 2-shard store grown with
`--data` naming its 2 shards and 2 more equals a 4-shard store made at once, byte for byte; only the new
shards' units are processed; a grow killed anywhere leaves a store that verifies (old or grown) and
resumes to the same bytes; a changed, dropped or too big shard, growing views and shards at once and
growing a store at a URL are refused in one line, bytes unchanged; a run on a store that is not
growing reads no marker to settle."""
import json
import re
import shutil
import signal

import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, run_cli, store_files

VIEWS = ["--views", "2"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Shards of 8, 8, 8 and 4 samples, a 2-view store made from all four at once, and the command line
    less --data / --out."""
    root = tmp_path_factory.mktemp("grow-shards")
    noise_shards(root / "d", 28, shard_size=8, seed=5)
    shards = [str(root / "d" / f"train-{i:06d}.tar") for i in range(4)]
    common = ["precompute", *TEACHER_ARGS, *FAST, *VIEWS, "--ray", "none"]
    made = invoke(*common, *_data(shards), "--out", root / "four.zarr")
    assert made.exit_code == 0, made.output
    return root, common, shards, store_files(root / "four.zarr")


def _views(common, n):
    i = common.index("--views")
    return [*common[:i + 1], str(n), *common[i + 2:]]


def _data(shards):
    return [a for s in shards for a in ("--data", s)]


def _two(root, common, shards, name):
    out = root / name
    first = invoke(*common, *_data(shards[:2]), "--out", out)
    assert first.exit_code == 0, first.output
    return out


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    return lines[0]


def test_grow_two_shards_to_four_equals_four_at_once_and_processes_only_new_shards(stores):
    root, common, shards, four = stores
    out = _two(root, common, shards, "grown.zarr")
    loud = [a for a in common if a != "--quiet"]
    grown = invoke(*loud, *_data(shards), "--out", out)
    assert grown.exit_code == 0, grown.output
    assert "units: 4 processed, 4 already done, 8 in the job" in grown.output, grown.output
    assert differing(four, store_files(out)) == []  # no journal left, zarr.json resized as zarr writes them
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and "8/8 units ok" in verified.output, verified.output
    again = invoke(*loud, *_data(shards), "--out", out)
    assert "units: 0 processed, 8 already done, 8 in the job" in again.output, again.output
    assert differing(four, store_files(out)) == []


def test_while_growing_readers_see_the_old_store_whole(stores, monkeypatch):
    """Before the last new unit is done, the root metadata and every zarr.json on disk are the old
    store's, and it verifies as the old store."""
    from attncache.pipeline.store import grow

    root, common, shards, _ = stores
    out = _two(root, common, shards, "reader.zarr")
    before = store_files(out)
    seen = {}

    def settle_never(store):  # the grow stops short of its end: what a reader sees meanwhile
        seen["verify"] = invoke("verify", out)
        return False

    monkeypatch.setattr(grow, "settle", settle_never)
    from attncache.pipeline.precompute import local
    monkeypatch.setattr(local, "settle", settle_never)
    assert invoke(*common, *_data(shards), "--out", out).exit_code == 0
    assert seen["verify"].exit_code == 0 and "4/4 units ok" in seen["verify"].output, seen["verify"].output
    now = store_files(out)
    assert [r for r in before if r.endswith("zarr.json") and before[r] != now[r]] == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["unit-done:1", "array-written:2:torn", "marker-tmp:4", "doc-renamed:3",
                                   "marker-tmp:5", "marker-renamed:7"])
def test_grow_killed_anywhere_resumes_to_the_same_bytes(stores, point):
    """Kills while the 4 new units are written (markers 1..4; the root metadata and the arrays' zarr.json
    still the old store's), among the resized zarr.json (doc-renamed), just after the root metadata
    says 4 shards (marker-tmp:5: no old marker rewritten yet) and among the old markers' rewrites (5..8)."""
    root, common, shards, four = stores
    out = _two(root, common, shards, f"killed-{point.replace(':', '-')}.zarr")
    killed = run_cli(*common, *_data(shards), "--out", out, fault=point)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    usable = invoke("verify", out)  # whatever the kill left, the store verifies as 2 or 4 shards
    assert usable.exit_code == 0 and re.search(r"\b(4/4|8/8) units ok", usable.output), usable.output
    final = run_cli(*common, *_data(shards), "--out", out)
    assert final.returncode == 0, final.stdout + final.stderr
    assert differing(four, store_files(out)) == []


def test_a_changed_old_shard_is_refused_in_one_line_naming_it(stores, tmp_path):
    root, common, shards, _ = stores
    out = _two(root, common, shards, "changed.zarr")
    before = store_files(out)
    moved = tmp_path / "train-000001.tar"
    shutil.copy(shards[2], moved)  # another shard's samples under shard 1's name
    line = _one_line(invoke(*common, *_data([shards[0], str(moved), *shards[2:]]), "--out", out))
    assert "holds a different cache: its shard 1 (" in line and "train-000001.tar" in line, line
    assert "keys_sha256" in line, line
    assert differing(before, store_files(out)) == []


def test_a_dropped_old_shard_is_refused_in_one_line_naming_it(stores):
    root, common, shards, _ = stores
    out = _two(root, common, shards, "dropped.zarr")
    before = store_files(out)
    line = _one_line(invoke(*common, *_data([shards[0], *shards[2:]]), "--out", out))
    assert "its shard 1 (" in line and "train-000001.tar" in line, line
    line = _one_line(invoke(*common, *_data(shards[:1]), "--out", out))
    assert "its shard 1 (" in line and "is not in --data" in line and "never drops shards" in line, line
    assert differing(before, store_files(out)) == []


def test_a_new_shard_bigger_than_the_slots_is_refused_in_one_line(stores, tmp_path):
    root, common, shards, _ = stores
    out = _two(root, common, shards, "big.zarr")
    before = store_files(out)
    noise_shards(tmp_path, 12, shard_size=12, seed=9, prefix="big")
    line = _one_line(invoke(*common, *_data([*shards[:2], str(tmp_path / "big-000000.tar")]), "--out", out))
    assert "big-000000.tar" in line and "12 samples, more than the 8 slots per shard" in line, line
    assert differing(before, store_files(out)) == []


def test_growing_views_and_shards_at_once_is_refused_in_one_line(stores):
    root, common, shards, _ = stores
    out = _two(root, common, shards, "both.zarr")
    before = store_files(out)
    line = _one_line(invoke(*_views(common, 3), *_data(shards), "--out", out))
    assert "grow views or shards, not both" in line and "views 2 -> 3, shards 2 -> 4" in line, line
    assert differing(before, store_files(out)) == []


def test_growing_a_store_at_a_url_is_refused_in_one_line(stores, tmp_path):
    import fsspec

    root, common, shards, _ = stores
    out = f"memory://grow-{tmp_path.name}/c.zarr"
    assert invoke(*common, *_data(shards[:2]), "--out", out).exit_code == 0
    fs = fsspec.filesystem("memory")
    before = {p: fs.cat_file(p) for p in fs.find(out.removeprefix("memory://"))}
    line = _one_line(invoke(*common, *_data(shards), "--out", out))
    assert "growing a store on an object store is not supported (shards 2 -> 4)" in line, line
    line = _one_line(invoke(*_views(common, 3), *_data(shards[:2]), "--out", out))
    assert "not supported (views 2 -> 3)" in line, line
    after = {p: fs.cat_file(p) for p in fs.find(out.removeprefix("memory://"))}
    assert after.keys() == before.keys() and all(after[p] == before[p] for p in before if "lease" not in p)


def test_settle_reads_no_marker_on_a_store_that_is_not_growing(stores, tmp_path):
    """The end of every run: without a grow's journal nothing is read; with one (a grow killed after its
    root metadata), every marker is read once and the journal goes."""
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.store.grow import settle
    from attncache.pipeline.store.reshape import JOURNAL

    root, _, _, four = stores
    copy = tmp_path / "c.zarr"
    shutil.copytree(root / "four.zarr", copy)
    store = CacheStore.open(copy, mode="r+")
    reads = []
    real = store.files.read
    store.files.read = lambda rel: (reads.append(rel), real(rel))[1]
    assert settle(store) is True
    assert [r for r in reads if r.startswith("units/")] == []
    (copy / JOURNAL).write_text(json.dumps({"views": 2, "shards": 2, "old": {}, "new": {}}))
    assert settle(store) is True
    assert len([r for r in reads if r.startswith("units/")]) == 8
    assert not (copy / JOURNAL).exists() and differing(four, store_files(copy)) == []

"""`attncache data pack` as users run it: samples shuffled across shards (seeded, recorded), one class
mapping shared by every split packed into a folder, refusals that write nothing, and the same bytes
for the same arguments."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attncache.pipeline.data.shards import decode_sample, iter_shard
from relhelp import invoke, png


def _folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"img{i:03d}.png").write_bytes(png(Image.fromarray(rng.integers(0, 256, (6, 6, 3),
                                                                                            dtype=np.uint8))))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(out: Path, prefix: str) -> list[list[tuple[str, int, bytes]]]:
    shards = []
    for path in sorted(out.glob(f"{prefix}-*.tar")):
        shards.append([(e.key, decode_sample(str(path), e)[1], e.members["png"]) for e in iter_shard(str(path))])
    return shards


@pytest.fixture
def ten_classes(tmp_path):
    return _folder(tmp_path / "src", {f"class{c}": 30 for c in range(10)})


def test_default_pack_mixes_classes_in_every_shard_and_records_the_seed(ten_classes, tmp_path):
    out = tmp_path / "out"
    result = invoke("data", "pack", ten_classes, out, "--shard-size", "30")
    assert result.exit_code == 0, result.output
    shards = _read(out, "shard")
    assert len(shards) == 10
    per_shard = [len({label for _, label, _ in shard}) for shard in shards]
    assert min(per_shard) >= 6, per_shard  # class order would put exactly 1 class in each shard
    classes = json.loads((out / "classes.json").read_text())
    assert classes == [f"class{c}" for c in range(10)]
    originals = {(f"class{c}", f"img{i:03d}"): (ten_classes / f"class{c}" / f"img{i:03d}.png").read_bytes()
                 for c in range(10) for i in range(30)}
    seen = Counter()
    for shard in shards:
        for key, label, data in shard:
            name = key.split("_", 1)[1]
            assert originals[(classes[label], name)] == data  # each image keeps its own class's label
            seen[label] += 1
    assert seen == {c: 30 for c in range(10)}
    manifest = json.loads((out / "shard-pack.json").read_text())
    assert (manifest["seed"], manifest["shuffle"], manifest["samples"]) == (0, True, 300)
    assert [s["count"] for s in manifest["shards"]] == [30] * 10
    assert "shuffled across shards with --seed 0" in result.output


def test_same_arguments_same_bytes_other_seed_other_order(ten_classes, tmp_path):
    for name in ("a", "b"):
        assert invoke("data", "pack", ten_classes, tmp_path / name, "--shard-size", "64", "--seed", "7").exit_code == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    again = invoke("data", "pack", ten_classes, tmp_path / "a", "--shard-size", "64", "--seed", "7")
    assert again.exit_code == 0 and _files(tmp_path / "a") == _files(tmp_path / "b")  # a re-run changes nothing
    assert invoke("data", "pack", ten_classes, tmp_path / "c", "--shard-size", "64", "--seed", "8").exit_code == 0
    a, c = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert a["shard-000000.tar"] != c["shard-000000.tar"] and a["classes.json"] == c["classes.json"]
    assert invoke("data", "pack", ten_classes, tmp_path / "d", "--shard-size", "64", "--no-shuffle").exit_code == 0
    first = [label for _, label, _ in _read(tmp_path / "d", "shard")[0]]
    assert first == sorted(first) and set(first) == {0, 1, 2}  # --no-shuffle: class order, as before


def test_val_split_uses_the_train_mapping_even_when_it_lacks_classes(tmp_path):
    train = _folder(tmp_path / "train", {"ant": 3, "bee": 3, "cat": 3})
    val = _folder(tmp_path / "val", {"ant": 2, "cat": 2}, seed=1)
    out = tmp_path / "out"
    assert invoke("data", "pack", train, out, "--prefix", "train").exit_code == 0
    mapping = (out / "classes.json").read_bytes()
    result = invoke("data", "pack", val, out, "--prefix", "val")
    assert result.exit_code == 0, result.output
    assert (out / "classes.json").read_bytes() == mapping  # not overwritten with val's own two classes
    labels = {key: label for shard in _read(out, "val") for key, label, _ in shard}
    assert sorted(labels.values()) == [0, 0, 2, 2]  # cat is class 2 of train's mapping, not val's 1
    assert all(key.startswith(f"{label:04d}_") for key, label in labels.items())
    assert "labels from the existing" in result.output


def test_a_class_the_mapping_lacks_is_refused_by_name_and_nothing_is_written(tmp_path):
    train = _folder(tmp_path / "train", {"ant": 2, "bee": 2})
    val = _folder(tmp_path / "val", {"ant": 1, "dog": 1, "eel": 1}, seed=2)
    out = tmp_path / "out"
    assert invoke("data", "pack", train, out, "--prefix", "train").exit_code == 0
    before = _files(out)
    result = invoke("data", "pack", val, out, "--prefix", "val")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: DataError: {val}: class folder 'dog', 'eel' not in the existing {out / 'classes.json'} (2 classes); "
        f"pack into a new OUT_DIR, or pack the split with every class first"]
    assert _files(out) == before


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not a readable class list"),
    (b'{"ant": 0}', "expected a JSON list of distinct class names"),
    (b'["ant", "ant"]', "expected a JSON list of distinct class names")])
def test_a_broken_classes_json_is_one_line_and_nothing_is_written(tmp_path, content, message):
    src = _folder(tmp_path / "src", {"ant": 2})
    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.json").write_bytes(content)
    result = invoke("data", "pack", src, out)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert f"{out / 'classes.json'}: {message}" in result.output and "Traceback" not in result.output
    assert _files(out) == {"classes.json": content}


def test_nonsense_pack_options_are_refused_before_work(tmp_path):
    src = _folder(tmp_path / "src", {"ant": 2})
    for args, needle in ((["--prefix", "../evil"], "--prefix '../evil'"), (["--prefix", "a/b"], "--prefix 'a/b'"),
                         (["--prefix", ""], "--prefix ''"), (["--shard-size", "0"], "--shard-size"),
                         (["--shard-size", "-3"], "--shard-size"), (["--seed", "-1"], "--seed"),
                         (["--seed", str(2**70)], "--seed"), (["--seed", "x"], "--seed")):
        result = invoke("data", "pack", src, tmp_path / "out" / "deep", *args)
        assert result.exit_code in (1, 2) and needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("evil*"))

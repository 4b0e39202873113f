"""The embedded data set: reproducible, labelled where it should be, knobs that change the images."""
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attncache.cli.main import cli
from attncache.pipeline.data.shards import decode_image, decode_sample, expand_shards, iter_shard
from attncache.pipeline.studies.synth import SHAPES, SynthConfig, render_sample, synth_dataset


def _entries(pattern):
    return [(url, e) for url in expand_shards(pattern) for e in iter_shard(url)]


def test_all_splits_are_written_reproducibly_and_only_labelled_splits_carry_labels(tmp_path):
    a = synth_dataset(tmp_path / "a", 40, 8, shard_size=16, seed=3, num_pool=20, num_shifted=12)
    b = synth_dataset(tmp_path / "b", 40, 8, shard_size=16, seed=3, num_pool=20, num_shifted=12)
    for split, count in (("train", 40), ("val", 8), ("pool", 20), ("shifted-pool", 12), ("shifted-train", 40),
                         ("shifted-val", 8)):
        assert a[f"num_{split}"] == count
        urls_a, urls_b = expand_shards(a[split]), expand_shards(b[split])
        assert [open(u, "rb").read() for u in urls_a] == [open(u, "rb").read() for u in urls_b]
        entries = _entries(a[split])
        assert len(entries) == count
        labelled = "pool" not in split
        for url, entry in entries:
            assert ("cls" in entry.members) == labelled
            decode_sample(url, entry) if labelled else decode_image(url, entry)
    meta = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert meta["config"]["num_classes"] == SynthConfig().num_classes
    assert json.loads((tmp_path / "a" / "classes.json").read_text()) == list(SHAPES[:SynthConfig().num_classes])


def test_every_class_occurs_and_the_seed_and_split_change_the_images():
    labels = [render_sample(0, "train", i)[1] for i in range(200)]
    assert set(labels) == set(range(SynthConfig().num_classes))
    assert render_sample(0, "train", 5) != render_sample(1, "train", 5)
    assert render_sample(0, "train", 5)[0] != render_sample(0, "val", 5)[0]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def test_the_shifted_style_is_a_different_distribution():
    """Stripes make the shifted backgrounds far less smooth than the default gradients."""
    def roughness(split):
        return np.mean([np.abs(np.diff(_pixels(render_sample(0, split, i)[0]), axis=1)).mean() for i in range(40)])

    assert roughness("shifted-train") > 1.3 * roughness("train")


def test_knobs_change_the_images_and_bad_knobs_are_refused():
    plain = SynthConfig(decoys=0, blobs=0, texture=False)
    assert render_sample(0, "train", 1, plain)[0] != render_sample(0, "train", 1)[0]
    assert _pixels(render_sample(0, "train", 1, SynthConfig(image_size=48))[0]).shape == (48, 48, 3)
    for bad in (dict(num_classes=1), dict(num_classes=9), dict(image_size=4), dict(scale=(0.3, 0.2)), dict(decoys=-1)):
        with pytest.raises(ValueError):
            SynthConfig(**bad)


def test_cli_synth_writes_the_splits_it_names(tmp_path):
    result = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "d"), "--num-train", "20", "--num-val", "4",
                                      "--num-pool", "10", "--num-shifted", "6", "--num-classes", "3",
                                      "--image-size", "24", "--shard-size", "8"])
    assert result.exit_code == 0, result.output
    for split in ("train", "val", "pool", "shifted-pool", "shifted-train", "shifted-val"):
        assert split in result.output
    labels = {decode_sample(u, e)[1] for u, e in _entries(str(tmp_path / "d" / "train-{000000..000002}.tar"))}
    assert labels <= {0, 1, 2}
    bad = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "e"), "--num-classes", "12"])
    assert bad.exit_code == 2 and "Invalid value for '--num-classes': 12 is not in the range 2<=x<=8." in bad.output

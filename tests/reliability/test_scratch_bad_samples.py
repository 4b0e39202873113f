"""A corrupt image in `train --mode scratch` and in `evaluate` on raw shards (no cache): recorded
with shard, key and reason, skipped, and counted in the summary, as precompute records it for a
cached run. 30ef699 stopped with a DataLoader error."""
import json
from pathlib import Path

from relhelp import invoke, noise_shards, png, write_tar
from PIL import Image

STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
           "--student-arg", "depth=2", "--student-arg", "embed_dim=32", "--student-arg", "num_heads=2"]


def _data(tmp_path: Path) -> str:
    pattern = noise_shards(tmp_path / "d", 24, 12, classes=4)
    good = png(Image.new("RGB", (32, 32), (9, 99, 199)))
    write_tar(tmp_path / "d" / "train-000002.tar", [("ok.png", good), ("ok.cls", b"1"),
                                                    ("broken.png", b"not a png at all"), ("broken.cls", b"2")])
    return pattern.replace("000001}", "000002}")


def test_corrupt_image_in_scratch_training_and_evaluate_is_recorded_and_skipped(tmp_path):
    data = _data(tmp_path)
    run = tmp_path / "run"
    result = invoke("train", "--data", data, "--mode", "scratch", "--out", run, "--epochs", "1", "--batch-size", "8",
                    "--workers", "0", "--threads", "1", "--quiet", "--json", *STUDENT)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["skipped"] == 1 and summary["samples"] == 25  # 24 + 2 - 1
    end = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "epoch_end" in l][0]
    assert end["epoch_samples"] == 25 and end["skipped"] == 1
    (record,) = end["skipped_samples"]
    assert record["key"] == "broken" and "undecodable" in record["reason"] and record["shard"].endswith("000002.tar")
    result = invoke("evaluate", run, "--data", data, "--workers", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["samples"] == 25 and report["skipped"] == 1 and report["skipped_samples"][0]["key"] == "broken"

"""`bench students-plot`: the points, the seed-noise rule and the files it writes; `bench students`'
head-subset arms (`ENC@H+H`) and their cache names."""
import json

from attncache.benchmarks import students, students_plot


def report() -> dict:
    caches = {"exact:fp16": {"bytes_per_sample": 91388}, "lowrank:r=8:int8": {"bytes_per_sample": 6128},
              "lowrank:r=2:int8": {"bytes_per_sample": 2412}, "lowrank:r=8:int8@0": {"bytes_per_sample": 3064}}
    tops = {"scratch": [51.0, 53.0, 52.0], "distill exact:fp16": [54.0, 55.0, 56.0],
            "distill lowrank:r=8:int8": [54.0, 55.0, 56.0], "distill lowrank:r=8:int8@0": [53.5, 54.5, 55.5],
            "distill lowrank:r=2:int8": [51.0, 52.0, 53.0]}
    runs = [{"arm": arm, "seed": seed, "top1": acc, "steps": 192, "transfer_first_last": None}
            for arm, accs in tops.items() for seed, acc in enumerate(accs)]
    table = {arm: {"mean": sum(a) / 3, "std": 1.0, "runs": a} for arm, a in tops.items()}
    return {"args": {"batch_size": "64"}, "caches": caches, "runs": runs, "table": table}


def test_the_smallest_arm_within_the_larger_std_of_exact_fp16_is_picked():
    rows = students_plot.points(report())
    # r=2 is 3.0 points under (std 1.0): out; the head subset is 0.5 under: in, and smaller than r=8
    assert students_plot.pick(rows)["encoding"] == "lowrank:r=8:int8@0"
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["scratch"]["bytes_per_sample"] is None and by_arm["scratch"]["top1"] == [51.0, 53.0, 52.0]
    assert by_arm["distill lowrank:r=2:int8"]["steps"] == [192]


def test_the_plot_command_writes_png_json_and_md(tmp_path):
    (tmp_path / "students.json").write_text(json.dumps(report()))
    students_plot.main([str(tmp_path), "--out", str(tmp_path / "fig" / "s")])
    png = (tmp_path / "fig" / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "fig" / "s.json").read_text())
    assert saved["chosen"] == "lowrank:r=8:int8@0" and len(saved["points"]) == 5
    md = (tmp_path / "fig" / "s.md").read_text().splitlines()
    assert md[0].startswith("| arm | bytes / sample-view |") and "seed 2" in md[0]
    assert md[2] == "| scratch | - | - | 51.00 | 53.00 | 52.00 | 52.00 | 1.00 | -3.00 | no |"
    assert md[3].startswith("| `exact:fp16` | 91,388 | 1.0 | 54.00 | 55.00 | 56.00 | 55.00 | 1.00 | +0.00 | yes |")
    assert "| `lowrank:r=2:int8` | 2,412 | 37.9 | 51.00 | 52.00 | 53.00 | 52.00 | 1.00 | -3.00 | no |" in md
    assert md[-1].endswith("`lowrank:r=8:int8@0`, 3,064 bytes per sample-view.")


def test_a_head_subset_arm_names_its_heads_for_precompute_and_train_and_its_own_cache():
    assert students.parse_arm("lowrank:r=8:int8") == ("lowrank:r=8:int8", None)
    assert students.parse_arm("lowrank:r=8:int8@0+2") == ("lowrank:r=8:int8", "0,2")
    assert students.cache_name("lowrank:r=8:int8") == "cache-lowrank_r8_int8.zarr"
    assert students.cache_name("lowrank:r=8:int8@0+2") == "cache-lowrank_r8_int8-heads0+2.zarr"

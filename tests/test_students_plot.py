"""`bench students-plot`: the points, the seed-noise rule and the files it writes; `bench students`'
head-subset arms (`ENC@H+H`) and their cache names."""
import json

from attncache.benchmarks import students, students_plot


TOPS = {"scratch": [51.0, 53.0, 52.0], "exact:fp16": [54.0, 55.0, 56.0], "lowrank:r=8:int8": [54.0, 55.0, 56.0],
        "lowrank:r=8:int8@0": [53.5, 54.5, 55.5], "lowrank:r=2:int8": [51.0, 52.0, 53.0]}
BYTES = {"exact:fp16": 91388, "lowrank:r=8:int8": 6128, "lowrank:r=2:int8": 2412, "lowrank:r=8:int8@0": 3064}


def fake_study(root, arms, seeds, with_report=True):
    """A `bench students` --out dir as the bench leaves it: caches in students.json, one run-*/ per arm and seed."""
    root.mkdir(parents=True, exist_ok=True)
    caches = {}
    for arm in arms:
        if arm != "scratch":
            caches[arm] = {"path": str(root.parent / students.cache_name(arm)), "bytes_per_sample": BYTES[arm]}
    if with_report:
        (root / "students.json").write_text(json.dumps({"caches": caches}))
    for arm in arms:
        for seed in seeds:
            run = root / f"run-{arm.replace(':', '_')}-s{seed}"
            run.mkdir()
            transfer = {"mode": "scratch", "cache": None} if arm == "scratch" else {
                "mode": "distill", "cache": caches[arm]["path"]}
            (run / "student.json").write_text(json.dumps({"transfer": transfer, "run": {"seed": seed, "threads": 1}}))
            lines = [{"step": 10, "transfer": 8.0}, {"step": 192, "transfer": 6.0},
                     {"step": 192, "eval": {"top1": TOPS[arm][seed]}}]
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def two_studies(tmp_path):
    """Seeds 0-1 of four arms in one dir, seed 2 of those and all seeds of the head subset in another,
    and a run cut before its evaluation (left out)."""
    a = fake_study(tmp_path / "a", ["scratch", "exact:fp16", "lowrank:r=8:int8", "lowrank:r=2:int8"], [0, 1])
    b = fake_study(tmp_path / "b", ["scratch", "exact:fp16", "lowrank:r=8:int8", "lowrank:r=2:int8"], [2])
    c = fake_study(tmp_path / "c", ["lowrank:r=8:int8@0"], [0, 1, 2])
    cut = a / "run-cut-s2"
    cut.mkdir()
    (cut / "student.json").write_text((a / "run-scratch-s0" / "student.json").read_text())
    (cut / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    return [a, b, c]


def test_the_smallest_arm_within_the_larger_std_of_exact_fp16_is_picked(tmp_path):
    dirs = two_studies(tmp_path)
    caches = students_plot.caches_of(dirs)
    rows = students_plot.points(students_plot.finished_runs(dirs, caches), caches)
    # r=2 is 3.0 points under (std 1.0): out; the head subset is 0.5 under: in, and smaller than r=8
    assert students_plot.pick(rows)["encoding"] == "lowrank:r=8:int8@0"
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["scratch"]["bytes_per_sample"] is None and by_arm["scratch"]["top1"] == [51.0, 53.0, 52.0]
    assert by_arm["scratch"]["seeds"] == [0, 1, 2] and by_arm["distill exact:fp16"]["std"] == 1.0
    assert by_arm["distill lowrank:r=2:int8"]["steps"] == [192]
    assert by_arm["distill lowrank:r=2:int8"]["transfer_first_last"] == [[8.0, 6.0]] * 3


def test_the_plot_command_writes_png_json_and_md(tmp_path):
    dirs = two_studies(tmp_path)
    students_plot.main([*map(str, dirs), "--out", str(tmp_path / "fig" / "s")])
    png = (tmp_path / "fig" / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "fig" / "s.json").read_text())
    assert saved["chosen"] == "lowrank:r=8:int8@0" and len(saved["points"]) == 5 and len(saved["runs"]) == 15
    md = (tmp_path / "fig" / "s.md").read_text().splitlines()
    assert md[0].startswith("| arm | bytes / sample-view |") and "seed 2" in md[0]
    assert md[2] == "| scratch | - | - | 51.00 | 53.00 | 52.00 | 52.00 | 1.00 | -3.00 | no | -3.00 -2.00 -4.00 |"
    assert md[3].startswith("| `exact:fp16` | 91,388 | 1.0 | 54.00 | 55.00 | 56.00 | 55.00 | 1.00 | +0.00 | yes |")
    assert ("| `lowrank:r=2:int8` | 2,412 | 37.9 | 51.00 | 52.00 | 53.00 | 52.00 | 1.00 | -3.00 | no "
            "| -3.00 -3.00 -3.00 |") in md
    assert md[-1].endswith("`lowrank:r=8:int8@0`, 3,064 bytes per sample-view.")


def test_a_head_subset_arm_names_its_heads_for_precompute_and_train_and_its_own_cache():
    assert students.parse_arm("lowrank:r=8:int8") == ("lowrank:r=8:int8", None)
    assert students.parse_arm("lowrank:r=8:int8@0+2") == ("lowrank:r=8:int8", "0,2")
    assert students.cache_name("lowrank:r=8:int8") == "cache-lowrank_r8_int8.zarr"
    assert students.cache_name("lowrank:r=8:int8@0+2") == "cache-lowrank_r8_int8-heads0+2.zarr"
    assert students.run_name("distill lowrank:r=8:int8@0", 1) == "run-distill-lowrank_r8_int8-heads0-s1"
    assert students.run_name("distill lowrank:r=8:int4:scale=token", 2) == "run-distill-lowrank_r8_int4_scaletoken-s2"
    assert students.run_name("scratch", 0) == "run-scratch-s0"

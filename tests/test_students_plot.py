"""`bench students-plot`: the points, the seed-noise rule and the files it writes; `bench students`'
head-subset arms (`ENC@H+H`) and their cache names."""
import json
from pathlib import Path

import pytest

from attncache.benchmarks import students, students_plot


TOPS = {"scratch": [51.0, 53.0, 52.0], "exact:fp16": [54.0, 55.0, 56.0], "lowrank:r=8:int8": [54.0, 55.0, 56.0],
        "lowrank:r=8:int8@0": [53.5, 54.5, 55.5], "lowrank:r=2:int8": [51.0, 52.0, 53.0]}
BYTES = {"exact:fp16": 91388, "lowrank:r=8:int8": 6128, "lowrank:r=2:int8": 2412, "lowrank:r=8:int8@0": 3064}


def fake_study(root, arms, seeds, with_report=True, mode="distill", tops=TOPS):
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
            run = root / f"run-{mode}-{arm.replace(':', '_')}-s{seed}"
            run.mkdir()
            transfer = {"mode": "scratch", "cache": None} if arm == "scratch" else {
                "mode": mode, "cache": caches[arm]["path"]}
            (run / "student.json").write_text(json.dumps({"transfer": transfer, "run": {"seed": seed, "threads": 1}}))
            lines = [{"step": 10, "transfer": 8.0}, {"step": 192, "transfer": 6.0},
                     {"step": 192, "eval": {"top1": tops[arm][seed]}}]
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
    (cut / "student.json").write_text((a / "run-distill-scratch-s0" / "student.json").read_text())
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


COPY_TOPS = {"exact:fp16": [60.0, 61.0, 62.0], "lowrank:r=8:int8": [60.0, 61.5, 61.0],
             "lowrank:r=2:int8": [57.0, 58.0, 56.0]}


def test_copy_arms_are_measured_against_copy_exact_fp16_and_a_default_must_fit_every_mode(tmp_path):
    """r=2 is within seed noise of exact:fp16 for distilled students and 4 points under it for copy
    students: each mode's own pick differs, and the one for every mode is the larger r=8."""
    tops = dict(TOPS, **{"lowrank:r=2:int8": [54.0, 55.0, 56.5]})
    d = fake_study(tmp_path / "d", ["scratch", "exact:fp16", "lowrank:r=8:int8", "lowrank:r=2:int8"], [0, 1, 2],
                   tops=tops)
    c = fake_study(tmp_path / "c", ["exact:fp16", "lowrank:r=8:int8", "lowrank:r=2:int8"], [0, 1, 2], mode="copy",
                   tops=COPY_TOPS)
    caches = students_plot.caches_of([d, c])
    rows = students_plot.points(students_plot.finished_runs([d, c], caches), caches)
    by_arm = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"scratch", "distill exact:fp16", "distill lowrank:r=8:int8", "distill lowrank:r=2:int8",
                           "copy exact:fp16", "copy lowrank:r=8:int8", "copy lowrank:r=2:int8"}
    assert by_arm["copy exact:fp16"]["top1"] == [60.0, 61.0, 62.0] and by_arm["copy exact:fp16"]["mode"] == "copy"
    assert students_plot.pick(rows, "distill")["encoding"] == "lowrank:r=2:int8"
    assert students_plot.pick(rows, "copy")["encoding"] == "lowrank:r=8:int8"
    assert students_plot.pick_all(rows)["encoding"] == "lowrank:r=8:int8"
    students_plot.main([str(d), str(c), "--out", str(tmp_path / "fig" / "s")])
    saved = json.loads((tmp_path / "fig" / "s.json").read_text())
    assert saved["chosen"] == "lowrank:r=8:int8"
    assert saved["chosen_per_mode"] == {"distill": "lowrank:r=2:int8", "copy": "lowrank:r=8:int8"}
    md = (tmp_path / "fig" / "s.md").read_text()
    # a copy arm's difference is to copy exact:fp16 (61.0), not to distill's (55.0)
    assert "| copy `lowrank:r=2:int8` | 2,412 | 37.9 | 57.00 | 58.00 | 56.00 | 57.00 | 1.00 | -4.00 | no |" in md
    assert md.rstrip().endswith("Smallest within seed noise in every mode (distill, copy): `lowrank:r=8:int8`, "
                                "6,128 bytes per sample-view.")


def test_a_mode_without_its_exact_fp16_arm_chooses_nothing(tmp_path):
    d = fake_study(tmp_path / "d", ["exact:fp16", "lowrank:r=8:int8"], [0, 1, 2])
    c = fake_study(tmp_path / "c", ["lowrank:r=8:int8"], [0, 1, 2], mode="copy", tops=COPY_TOPS)
    caches = students_plot.caches_of([d, c])
    rows = students_plot.points(students_plot.finished_runs([d, c], caches), caches)
    assert students_plot.pick(rows, "copy") is None and students_plot.pick_all(rows) is None


def test_copy_arms_train_with_the_eval_cache_of_the_val_split_and_modes_are_checked():
    cache = {"path": "c.zarr", "eval_path": "c-val.zarr", "heads": "0,2"}
    assert students.arm_args("copy", dict(cache, heads=None), "0:3", "3.0") == [
        "--mode", "copy", "--cache", "c.zarr", "--eval-cache", "c-val.zarr", "--layers", "0:3"]
    assert students.arm_args("distill", cache, "0:3", "3.0") == ["--mode", "distill", "--cache", "c.zarr",
                                                                 "--distill-weight", "3.0", "--layers", "0:3",
                                                                 "--heads", "0,2"]
    assert students.cache_name("lowrank:r=2:int4@0+1", "val") == "cache-lowrank_r2_int4-heads0+1-val.zarr"
    assert students.parse_modes("distill, copy,copy") == ["distill", "copy"]
    for bad in ("", "copy,finetune", ","):
        with pytest.raises(SystemExit, match="--modes"):
            students.parse_modes(bad)


def test_copy_with_a_head_subset_arm_is_refused_before_any_cache_is_made(tmp_path):
    with pytest.raises(SystemExit, match="copy students transfer whole layers.*lowrank:r=8:int8@0"):
        students.main(["--data", "x.tar", "--val", "v.tar", "--teacher", "t", "--out", str(tmp_path / "o"),
                       "--modes", "distill,copy", "--encodings", "exact:fp16,lowrank:r=8:int8@0"])
    assert not (tmp_path / "o").exists()


def test_one_directory_of_both_modes_compares_scratch_with_distill_exact_fp16(tmp_path):
    """run-copy-* sorts before run-distill-*: the mode order is distill first all the same."""
    d = fake_study(tmp_path / "d", ["scratch", "exact:fp16", "lowrank:r=8:int8"], [0, 1, 2])
    fake_study(tmp_path / "c", ["exact:fp16", "lowrank:r=8:int8"], [0, 1, 2], mode="copy", tops=COPY_TOPS)
    for run in (tmp_path / "c").glob("run-*"):
        run.rename(d / run.name)
    caches = students_plot.caches_of([d, tmp_path / "c"])
    rows = students_plot.points(students_plot.finished_runs([d], caches), caches)
    assert students_plot.modes_of(rows) == ["distill", "copy"]
    md = students_plot.table(rows)
    assert "| scratch | - | - | 51.00 | 53.00 | 52.00 | 52.00 | 1.00 | -3.00 | no |" in md
    assert md.index("distill `exact:fp16`") < md.index("copy `exact:fp16`")


def test_encodings_are_trimmed_keep_their_rank_schedules_and_are_given_once():
    assert students.parse_encodings(" lowrank:r=2:int4 , exact:fp16,") == ["lowrank:r=2:int4", "exact:fp16"]
    assert students.parse_encodings("exact:fp16,lowrank:r=4x6,16x6:int8,lowrank:r=4,8") == [
        "exact:fp16", "lowrank:r=4x6,16x6:int8", "lowrank:r=4,8"]
    assert students.parse_encodings("") == []
    with pytest.raises(SystemExit, match="exact:fp16 given twice"):
        students.parse_encodings("exact:fp16, exact:fp16")


@pytest.mark.parametrize("text, why", [("", "is not an integer"), ("0,x", "'x' is not an integer"),
                                       ("-1", "outside 0..4294967295"), (str(2 ** 32), "outside"),
                                       ("0,1,0", "0 given twice")])
def test_bad_seeds_are_refused_before_any_cache_is_made(tmp_path, text, why):
    with pytest.raises(SystemExit, match=why):
        students.main(["--data", "x.tar", "--val", "v.tar", "--teacher", "t", "--out", str(tmp_path / "o"),
                       "--seeds", text])
    assert not (tmp_path / "o").exists()
    assert students.parse_seeds(" 2, 0 ") == [2, 0]


def fake_attncache(calls):
    """Stands in for the `attncache` subprocesses of `bench students`: precompute makes the cache dir,
    inspect reports its bytes, train leaves the run files students-plot reads and prints its summary."""
    def run(*args):
        calls.append(args)
        command = args[0]
        if command == "precompute":
            (Path(args[args.index("--out") + 1])).mkdir(parents=True, exist_ok=True)
            return ""
        if command == "inspect":
            return json.dumps({"bytes_per_sample": 1000 + len(args[1])})
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        mode = args[args.index("--mode") + 1]
        cache = args[args.index("--cache") + 1] if "--cache" in args else None
        seed = int(args[args.index("--seed") + 1])
        top1 = 50.0 + seed + (len(cache) % 7 if cache else 0)
        (out / "student.json").write_text(json.dumps({"transfer": {"mode": mode, "cache": cache},
                                                      "run": {"seed": seed, "threads": 1}}))
        (out / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval": {"top1": top1}}) + "\n")
        return json.dumps({"eval": {"top1": top1}, "steps": 4})
    return run


def faked_bench(tmp_path, monkeypatch, seeds):
    """`bench students` with its subprocesses stood in for: (calls made, --out, the common options)."""
    calls = []
    monkeypatch.setattr(students, "attncache", fake_attncache(calls))
    out = tmp_path / "o"
    return calls, out, ["--data", "x.tar", "--val", "v.tar", "--teacher", "t", "--out", str(out), "--seeds", seeds]


def test_a_second_invocation_into_the_same_out_keeps_the_first_ones_caches_and_runs(tmp_path, monkeypatch):
    calls, out, common = faked_bench(tmp_path, monkeypatch, "0,1")
    students.main([*common, "--encodings", "exact:fp16,lowrank:r=8:int8"])
    students.main([*common, "--encodings", "exact:fp16,lowrank:r=2:int4", "--no-scratch", "--modes", "copy"])
    report = json.loads((out / "students.json").read_text())
    assert set(report["caches"]) == {"exact:fp16", "lowrank:r=8:int8", "lowrank:r=2:int4"}
    assert sorted({r["arm"] for r in report["runs"]}) == [
        "copy exact:fp16", "copy lowrank:r=2:int4", "distill exact:fp16", "distill lowrank:r=8:int8", "scratch"]
    assert len(report["runs"]) == 10 and set(report["table"]["scratch"]["runs"]) == {50.0, 51.0}
    # every run directory of both invocations is plotted with its own cache's bytes
    students_plot.main([str(out), "--out", str(tmp_path / "fig" / "s")])
    saved = json.loads((tmp_path / "fig" / "s.json").read_text())
    assert len(saved["runs"]) == 10 and len(saved["points"]) == 5
    assert saved["chosen_per_mode"]["copy"] is not None and saved["chosen_per_mode"]["distill"] is not None


def test_an_invocation_with_other_shared_settings_into_the_same_out_is_refused(tmp_path, monkeypatch):
    calls, out, common = faked_bench(tmp_path, monkeypatch, "0")
    students.main([*common, "--encodings", "exact:fp16"])
    before, made = (out / "students.json").read_bytes(), len(calls)
    with pytest.raises(SystemExit, match=r"--epochs 5 there, 9 now.*give another --out"):
        students.main([*common, "--encodings", "exact:fp16", "--epochs", "9"])
    assert (out / "students.json").read_bytes() == before and len(calls) == made


def test_arms_of_other_seed_sets_keep_their_seed_columns_and_a_mode_without_reference_says_so(tmp_path):
    d = fake_study(tmp_path / "d", ["exact:fp16", "lowrank:r=8:int8"], [0, 1, 2])
    c = fake_study(tmp_path / "c", ["lowrank:r=8:int8"], [1, 2], mode="copy", tops=COPY_TOPS)
    caches = students_plot.caches_of([d, c])
    rows = students_plot.points(students_plot.finished_runs([d, c], caches), caches)
    md = students_plot.table(rows).splitlines()
    assert len({line.count("|") for line in md if line.startswith("|")}) == 1  # every row has every column
    assert "| copy `lowrank:r=8:int8` | 6,128 | - | - | 61.50 | 61.00 |" in "\n".join(md)
    assert "No pick (copy): no exact:fp16 arm of copy to measure the others against." in md


def test_the_plot_refuses_runs_whose_cache_no_report_names_and_dirs_without_runs(tmp_path):
    d = fake_study(tmp_path / "d", ["exact:fp16"], [0], with_report=False)
    with pytest.raises(SystemExit, match="named by no students.json"):
        students_plot.main([str(d), "--out", str(tmp_path / "s")])
    (tmp_path / "e").mkdir()
    with pytest.raises(SystemExit, match="no finished run"):
        students_plot.main([str(tmp_path / "e"), "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s.png").exists()


def test_a_cut_report_in_the_out_is_refused_in_one_line_and_left_as_it_is(tmp_path, monkeypatch):
    calls, out, common = faked_bench(tmp_path, monkeypatch, "0")
    students.main([*common, "--encodings", "exact:fp16"])
    cut = (out / "students.json").read_bytes()[:40]
    (out / "students.json").write_bytes(cut)
    with pytest.raises(SystemExit, match=r"students.json: not a `bench students` report .*give another --out"):
        students.main([*common, "--encodings", "exact:fp16"])
    assert (out / "students.json").read_bytes() == cut

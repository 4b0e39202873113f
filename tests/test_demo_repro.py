"""`attncache demo --quick` and `attncache repro` end to end, as users start them."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from attncache.cli.main import cli
from attncache.pipeline.studies.repro_report import arm_stats, gap_recovered, within_noise


@pytest.mark.slow
def test_demo_quick_runs_the_whole_job_and_draws_both_figures(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for step in ("data:", "teacher: supervised", "cache cache.zarr", "cache eval.zarr", "student distill", "student scratch",
                 "| from scratch |", "| attention distillation from the cache |", "attncache precompute"):
        assert step in result.output
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(summary["runs"]) == {"distill", "scratch"}
    assert summary["runs"]["distill"]["steps"] == summary["runs"]["scratch"]["steps"] > 0
    for run in summary["runs"].values():  # --eval-every 1 over --quick's 2 epochs: the curves' val points
        rows = [json.loads(line) for line in (Path(run["run"]) / "metrics.jsonl").read_text().splitlines()]
        assert len([r for r in rows if isinstance(r.get("eval"), dict) and "top1" in r["eval"]]) == 2
    for figure in summary["figures"].values():
        with Image.open(figure) as image:
            assert image.size[0] > 300 and image.size[1] > 200


def test_gap_recovered_and_noise_are_computed_as_the_paper_states_them():
    results = [{"arm": a, "top1": v} for a, vs in (("scratch", (40, 42)), ("finetune", (80, 82)),
                                                   ("copy", (70, 72)), ("distill", (60, 61)),
                                                   ("distill-online", (60.5, 62.5))) for v in vs]
    stats = arm_stats(results)
    assert stats["scratch"]["mean"] == 41 and stats["scratch"]["std"] == pytest.approx(2 ** 0.5)
    assert gap_recovered(stats, "copy") == pytest.approx(30 / 40)
    diff, se = within_noise(stats, "distill", "distill-online")
    assert diff == pytest.approx(-1.0) and se == pytest.approx((0.5 / 2 + 2 / 2) ** 0.5)
    assert gap_recovered({"copy": stats["copy"]}, "copy") is None


@pytest.mark.slow
def test_repro_at_the_smallest_scale_writes_results_and_resumes_without_retraining(tmp_path):
    args = ["repro", "--out", str(tmp_path / "r"), "--scale", "0.0625", "--seeds", "0", "--views", "1,2",
            "--student-epochs", "1", "--teacher-epochs", "1", "--groups", "main,views", "--batch-size", "64"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "RESULTS.md").read_text()
    for needle in ("## Main table", "| scratch |", "| fine-tune |", "| attention copy |", "| copy Q |",
                   "distill + fine-tune ensemble", "Cache vs online teacher", "## Cached views V",
                   "attncache teacher pretrain --method mae", "attncache train --data", "scratch → fine-tune gap"):
        assert needle in text, needle
    report = json.loads((tmp_path / "r" / "results.json").read_text())
    arms = {r["arm"] for r in report["results"]}
    assert arms == {"scratch", "finetune", "copy", "copy_q", "distill", "distill-v1", "distill-online", "ensemble"}
    for png in ("repro_main.png", "repro_views.png", "repro_curves.png"):
        assert (tmp_path / "r" / "figures" / png).is_file()
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0
    rerun = json.loads((tmp_path / "r" / "results.json").read_text())
    assert not [c for c in rerun["commands"] if c["step"].startswith(("train", "teacher", "ensemble"))]
    assert [r["top1"] for r in rerun["results"]] == [r["top1"] for r in report["results"]]


def test_a_study_cache_of_another_encoding_is_refused_not_trained_from(synth_data, tmp_path, monkeypatch):
    """A study begun under the old default (lowrank:r=8:int8), re-run for more seeds under the new one:
    its finished caches would be trained from while the report names the new encoding. `repro`
    refuses, names the --encoding that resumes the study, runs nothing and changes no byte."""
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute
    from attncache.pipeline.studies import repro
    from attncache.pipeline.teacher.model import TeacherConfig

    teacher = TeacherConfig("vit_tiny_patch16_224", (("depth", 3), ("embed_dim", 48), ("img_size", 32),
                                                     ("num_heads", 3), ("patch_size", 8)), random_init=True, seed=0)
    paths = repro.Paths(tmp_path / "study")
    store = paths.cache("mae-train")
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(store), teacher=teacher, views=1,
                                    encoding="lowrank:r=8:int8", batch_size=32, workers=0, threads=1, progress=False))
    before = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    calls = []
    monkeypatch.setattr(repro, "attncache", lambda log, step, args, quiet=False: calls.append(args) or "")
    cfg = repro.ReproConfig(out=str(tmp_path / "study"))
    assert cfg.encoding == "lowrank:r=2:int4"
    with pytest.raises(repro.StudyConflict, match=r"cache mae-train holds lowrank:r=8:int8, this run asks for "
                                                  r"lowrank:r=2:int4: resume the study with `attncache repro --out "
                                                  r".* --encoding lowrank:r=8:int8`"):
        repro.make_cache(cfg, paths, repro.Log(), "mae-train", Path("t"), synth_data["val"], 1, "eval", cfg.encoding)
    assert calls == [] and {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()} == before
    # with the encoding it holds: finished, nothing to run; asked for more views: precompute grows it
    old = repro.ReproConfig(out=str(tmp_path / "study"), encoding="lowrank:r=8:int8")
    repro.make_cache(old, paths, repro.Log(), "mae-train", Path("t"), synth_data["val"], 1, "eval", old.encoding)
    assert calls == []
    repro.make_cache(old, paths, repro.Log(), "mae-train", Path("t"), synth_data["val"], 2, "eval", old.encoding)
    assert len(calls) == 1 and calls[0][calls[0].index("--views") + 1] == "2"


def test_a_study_cache_made_under_the_old_compressor_resumes_and_grows_with_its_own(synth_data, tmp_path,
                                                                                     monkeypatch):
    """Default int4 caches were zstd:3 before 2026-12-03 and are zstd:3:shuffle now: a study begun
    before must still grow (more views) and resume, so precompute is given the store's compressor,
    not the new default that it would refuse."""
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute
    from attncache.pipeline.studies import repro
    from attncache.pipeline.teacher.model import TeacherConfig

    teacher = TeacherConfig("vit_tiny_patch16_224", (("depth", 3), ("embed_dim", 48), ("img_size", 32),
                                                     ("num_heads", 3), ("patch_size", 8)), random_init=True, seed=0)
    paths = repro.Paths(tmp_path / "study")
    store = paths.cache("mae-train")
    run_precompute(PrecomputeConfig(data=(synth_data["val"],), out=str(store), teacher=teacher, views=1,
                                    encoding="lowrank:r=2:int4", compression="zstd:3", batch_size=32, workers=0,
                                    threads=1, progress=False))
    calls = []
    monkeypatch.setattr(repro, "attncache", lambda log, step, args, quiet=False: calls.append(args) or "")
    cfg = repro.ReproConfig(out=str(tmp_path / "study"))
    repro.make_cache(cfg, paths, repro.Log(), "mae-train", Path("t"), synth_data["val"], 2, "eval", cfg.encoding)
    (args,) = calls
    assert args[args.index("--compression") + 1] == "zstd:3" and args[args.index("--views") + 1] == "2"
    fresh = paths.cache("mae-val")
    repro.make_cache(cfg, paths, repro.Log(), "mae-val", Path("t"), synth_data["val"], 1, "eval", cfg.encoding)
    assert "--compression" not in calls[1] and not fresh.exists()  # a new cache: its encoding's own


def test_repro_prints_a_study_conflict_in_one_line(tmp_path, monkeypatch):
    from attncache.pipeline.studies import repro

    def conflict(cfg):
        raise repro.StudyConflict("study/caches/mae-train.zarr: this study's cache mae-train holds X")
    monkeypatch.setattr(repro, "run_study", conflict)
    result = CliRunner().invoke(cli, ["repro", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: study/caches/mae-train.zarr: this study's cache mae-train holds X")

"""`attncache compare`: runs differing only by seed pooled as mean ± sample std; the PNG; non-runs named."""
import json
import math

import pytest
from click.testing import CliRunner

from attncache.cli.main import cli

STUDENT = ["--student", "vit_tiny_patch16_224", *[a for kv in ("img_size=32", "patch_size=8", "depth=1",
           "embed_dim=32", "num_heads=2") for a in ("--student-arg", kv)]]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    tmp = tmp_path_factory.mktemp("compare")
    info = synth_dataset(tmp / "d", num_train=32, num_val=16, config=SynthConfig(image_size=32, num_classes=4),
                         shard_size=32, seed=0)
    base = ["train", "--data", info["train"], "--eval-data", info["val"], "--mode", "scratch", *STUDENT,
            "--max-steps", "2", "--batch-size", "16", "--workers", "0", "--num-classes", "4", "--quiet",
            "--log-every", "1"]
    runs = {"a_s0": ["--seed", "0"], "a_s1": ["--seed", "1"], "b_s0": ["--seed", "0", "--lr", "0.01"]}
    for name, extra in runs.items():
        made = CliRunner().invoke(cli, [*base, *extra, "--out", str(tmp / name)])
        assert made.exit_code == 0, made.output
    return tmp


def last(run_dir, pick):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [pick(r) for r in rows if pick(r) is not None][-1]


def test_compare_pools_seeds_and_draws_one_png(three_runs, tmp_path):
    runs = [str(three_runs / n) for n in ("a_s0", "a_s1", "b_s0")]
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["compare", *runs, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = json.loads(result.output)["groups"]
    assert [g["runs"] for g in groups] == [["a_s0", "a_s1"], ["b_s0"]]
    assert groups[0]["seeds"] == [0, 1] and groups[0]["n"] == 2
    for metric, pick in (("train_loss", lambda r: r.get("loss")), ("train_ce", lambda r: r.get("ce")),
                         ("val_top1", lambda r: r["eval"]["top1"] if "eval" in r else None)):
        a, b = (last(three_runs / n, pick) for n in ("a_s0", "a_s1"))
        mean = (a + b) / 2
        std = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / 1)  # sample std, n - 1 = 1
        assert groups[0][metric]["mean"] == pytest.approx(mean) and groups[0][metric]["std"] == pytest.approx(std)
        assert groups[0][metric]["n"] == 2
        assert groups[1][metric]["mean"] == pytest.approx(last(three_runs / "b_s0", pick))
        assert groups[1][metric]["std"] is None and groups[1][metric]["n"] == 1
    assert groups[0]["transfer_loss"]["mean"] is None  # scratch runs have no transfer term
    table = CliRunner().invoke(cli, ["compare", *runs, "--out", str(out)])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split()[:2] == ["runs", "seeds"]
    assert lines[1].startswith("a_s0, a_s1") and "± " in lines[1] and "(n=2)" in lines[1]
    assert lines[2].startswith("b_s0") and "(n=1)" in lines[2]


def test_a_path_that_is_not_a_run_is_one_line(three_runs, tmp_path):
    out = tmp_path / "c.png"
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["compare", str(three_runs / "a_s0"), str(tmp_path / "empty"),
                                      "--out", str(out)])
    assert result.exit_code == 0 and out.is_file()
    named = [l for l in result.output.splitlines() if "empty" in l]
    assert len(named) == 1 and "not a run directory" in named[0] and "Traceback" not in result.output
    none = CliRunner().invoke(cli, ["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")])
    assert none.exit_code == 1 and none.output.strip().count("\n") == 0 and "missing" in none.output
    assert not (tmp_path / "d.png").exists()


def test_eval_every_writes_val_top1_per_epoch_and_leaves_the_steps_alone(tmp_path):
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=32, num_val=16, config=SynthConfig(image_size=32, num_classes=4),
                         shard_size=32, seed=0)
    base = ["train", "--data", info["train"], "--eval-data", info["val"], "--mode", "scratch", *STUDENT,
            "--epochs", "3", "--batch-size", "16", "--workers", "0", "--num-classes", "4", "--quiet"]
    for name, extra in (("plain", []), ("every", ["--eval-every", "1"])):
        made = CliRunner().invoke(cli, [*base, *extra, "--out", str(tmp_path / name)])
        assert made.exit_code == 0, made.output
    # evaluating between epochs changes no step: the same weights, bit for bit
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "every" / "model.safetensors").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    ends = {r["epoch_end"]: r["step"] for r in rows if "epoch_end" in r}
    assert [(r.get("epoch"), r["step"]) for r in evals] == [(0, ends[0]), (1, ends[1]), (None, ends[2])]
    assert all(0 <= r["eval"]["top1"] <= 100 for r in evals)
    # 2 steps an epoch, under the default --log-every 10: each epoch's last step is still logged
    assert [r["step"] for r in rows if "loss" in r] == [ends[0], ends[1], ends[2]] == [2, 4, 6]
    plain = [r for r in (json.loads(l) for l in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())
             if "eval" in r]
    assert len(plain) == 1 and plain[0]["eval"]["top1"] == evals[-1]["eval"]["top1"]
    refused = CliRunner().invoke(cli, ["train", "--data", info["train"], "--mode", "scratch", *STUDENT, "--epochs", "1",
                                       "--eval-every", "1", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--eval-every" in refused.output and "--eval-data" in refused.output
    assert not (tmp_path / "x").exists()


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _evals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval"]["top1"]) for r in rows if isinstance(r.get("eval"), dict)]


def test_the_figure_pools_seeds_by_colour_draws_val_top1_and_labels_each_configuration_once(three_runs):
    from attncache.pipeline.tools.compare import figure, group_runs, group_labels, load_run

    groups = group_runs([load_run(three_runs / n) for n in ("a_s0", "a_s1", "b_s0")])
    assert group_labels(groups) == ["lr=0.001", "lr=0.01"]  # what tells the configurations apart, nothing else
    fig = figure(groups)
    val = fig.axes[2].lines
    assert [list(zip(l.get_xdata(), l.get_ydata())) for l in val] == [_evals(three_runs / n)
                                                                      for n in ("a_s0", "a_s1", "b_s0")]
    assert val[0].get_color() == val[1].get_color() != val[2].get_color()  # a configuration is one colour
    assert val[0].get_linestyle() != val[1].get_linestyle()  # its seeds one style each
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("lr=0.001 (2 seeds, val top-1 ") and labels[1].startswith("lr=0.01 (1 seed, ")
    assert labels[2:] == ["seed 0", "seed 1"] and not any(ax.get_legend() for ax in fig.axes)
    assert [list(l.get_ydata()) for l in fig.axes[0].lines][0] == [r["ce"] for r in _rows(three_runs / "a_s0")
                                                                   if "ce" in r]
    assert fig.axes[1].texts[0].get_text() == "no data in these runs"  # scratch runs have no transfer loss


def test_the_demos_learning_curves_draw_val_top1_per_evaluation(three_runs):
    from attncache.pipeline.tools.show import learning_curves_figure

    fig = learning_curves_figure({"a": three_runs / "a_s0", "b": three_runs / "b_s0"})
    assert fig.axes[1].get_ylabel() == "val top-1 % (dashed)"
    assert [list(zip(l.get_xdata(), l.get_ydata())) for l in fig.axes[1].lines] == \
        [_evals(three_runs / "a_s0"), _evals(three_runs / "b_s0")]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == \
        [f"{n} (val top-1 {_evals(three_runs / r)[-1][1]:.1f})" for n, r in (("a", "a_s0"), ("b", "b_s0"))]


def test_modes_are_compared_on_cross_entropy_not_on_the_total_loss(tmp_path):
    """A distilled run's total loss adds 3 x the transfer loss; the panel and the table show `ce`."""
    from attncache.pipeline.tools.compare import figure, group_runs, load_run, summarize, table_lines

    rows = {"scratch": [{"step": 10, "loss": 1.5, "ce": 1.5, "transfer": None}],
            "distill": [{"step": 10, "loss": 37.5, "ce": 1.2, "transfer": 12.1}]}
    for name, metrics in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "student.json").write_text(json.dumps({"transfer": {"mode": name}, "run": {"seed": 0}}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    groups = group_runs([load_run(tmp_path / n) for n in rows])
    summary = summarize(groups)
    assert [r["train_ce"]["mean"] for r in summary] == [1.5, 1.2] and summary[1]["train_loss"]["mean"] == 37.5
    assert [list(l.get_ydata()) for l in figure(groups).axes[0].lines] == [[1.5], [1.2]]
    assert table_lines(summary)[0].split()[2:4] == ["train", "CE"] and "1.2000 (n=1)" in table_lines(summary)[2]

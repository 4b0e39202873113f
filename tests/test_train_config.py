"""`train -c FILE.yaml` and the paper's recipes shipped as named configs (issue 16 items 1-2): a YAML
config reaches the same training config as the same options typed, the command line overrides it,
unknown keys and bad values are refused in one line, and the shipped recipes hold the paper's values."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

COMMON = ["train", "--data", "d/train-{0..1}.tar", "--num-classes", "4", "--device", "cpu", "--threads", "1"]


def _invoke(args):
    from attncache.cli.main import cli

    return CliRunner().invoke(cli, args)


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_a_yaml_config_equals_the_same_options_on_the_command_line(configs, tmp_path):
    out = str(tmp_path / "run")
    typed = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "depth=2",
             "--out", out, "--batch-size", "8", "--workers", "0", "--max-steps", "3", "--mode", "scratch",
             "--lr", "1e-3", "--drop-path", "0.1", "--quiet", "--layers", "0:-1", "--opt-betas", "0.9", "0.95"]
    config = _write(tmp_path, f"model: vit_tiny_patch16_224\nstudent_arg: [img_size=32, depth=2]\noutput: {out}\n"
                              "batch-size: 8\nworkers: 0\nmax_steps: 3\nmode: scratch\nlr: 1e-3\ndrop_path: 0.1\n"
                              "quiet: true\nlayers: '0:-1'\nopt-betas: [0.9, 0.95]\n")
    for args in (typed, ["-c", config], ["--config", config]):
        result = _invoke([*COMMON, *args])
        assert result.exit_code == 0, result.output
    assert len(configs) == 3 and configs[0] == configs[1] == configs[2]
    assert configs[0].batch_size == 8 and configs[0].optim.lr == 1e-3 and configs[0].progress is False
    assert configs[0].optim.betas == (0.9, 0.95)
    assert dict(configs[0].spec.student.model_args) == {"img_size": 32, "depth": 2}


def test_the_command_line_overrides_the_file(configs, tmp_path):
    out = str(tmp_path / "run")
    config = _write(tmp_path, f"student: vit_tiny_patch16_224\nout: {out}\nbatch_size: 8\nmax_steps: 3\n"
                              "lr: 0.5\nstudent_arg: [depth=2]\n")
    result = _invoke([*COMMON, "-c", config, "-b", "16", "--lr", "0.25", "--student-arg", "depth=3"])
    assert result.exit_code == 0, result.output
    assert configs[0].batch_size == 16 and configs[0].optim.lr == 0.25 and configs[0].max_steps == 3
    assert dict(configs[0].spec.student.model_args) == {"depth": 3}


def test_an_unknown_key_is_refused_in_one_line_naming_key_and_file(configs, tmp_path):
    config = _write(tmp_path, "student: vit_tiny_patch16_224\nbatch_szie: 8\n")
    result = _invoke([*COMMON, "--out", str(tmp_path / "r"), "--max-steps", "1", "-c", config])
    assert result.exit_code == 2 and not configs
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "'batch_szie'" in error[0] and config in error[0], result.output


@pytest.mark.parametrize("key,value,typed", [("lr", "0", ["--lr", "0"]), ("batch_size", "0", ["--batch-size", "0"]),
                                             ("distill_weight", "inf", ["--distill-weight", "inf"]),
                                             ("drop_path", "1.0", ["--drop-path", "1.0"]),
                                             ("opt_betas", "[0.9, 1.0]", ["--opt-betas", "0.9", "1.0"]),
                                             ("layers", "'3:1'", ["--layers", "3:1"])])
def test_a_bad_value_gets_the_command_lines_range_error(configs, tmp_path, key, value, typed):
    base = [*COMMON, "--student", "vit_tiny_patch16_224", "--out", str(tmp_path / "r"), "--max-steps", "1"]
    typed = _invoke([*base, *typed])
    from_file = _invoke([*base, "-c", _write(tmp_path, f"{key}: {value}\n")])
    assert typed.exit_code == from_file.exit_code == 2 and not configs
    error = [line for line in from_file.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and error[0] == typed.output.strip().splitlines()[-1], (typed.output, from_file.output)


def test_a_missing_config_is_refused_naming_the_shipped_recipes(configs):
    result = _invoke([*COMMON, "-c", "paper-distil"])
    assert result.exit_code == 2 and "paper-distill" in result.output and "paper-copy" in result.output


# ------------------------------------------------------------------------------------------ the recipes


def _shipped(name):
    from attncache.cli.train_config import CONFIG_DIR, read, resolve
    from attncache.cli.train_cmd import train

    path = resolve(name)
    assert path == CONFIG_DIR / f"{name}.yaml"
    return read(path, train, "config")


def test_the_paper_distill_recipe_holds_the_papers_values():
    cfg = _shipped("paper-distill")
    global_batch = cfg["batch_size"] * 8  # the file's comment: 8 ranks
    assert cfg == {"mode": "distill", "distill_weight": 3.0, "layers": "0:-3", "epochs": 200, "warmup_epochs": 20,
                   "batch_size": 256, "lr": pytest.approx(1e-4 * global_batch / 256), "weight_decay": 0.3,
                   "betas": [0.9, 0.95],
                   "drop_path": 0.2, "model_ema_decay": 0.9999, "student_args": ["global_pool=avg"]}
    # mixup 0.8, cutmix 1.0 and erasing 0.25 come with the cache: precompute --recipe train_mix
    from attncache.pipeline.augment.ops import RecipeDefaults
    from attncache.pipeline.augment.spec import parse_ops

    ops = {op.name: op.kwargs for op in parse_ops("train_mix", RecipeDefaults(224, (0.5,) * 3, (0.5,) * 3))}
    assert ops["erase"]["p"] == 0.25 and ops["mix"]["mixup_alpha"] == 0.8 and ops["mix"]["cutmix_alpha"] == 1.0
    text = (Path(__import__("attncache.cli.train_config", fromlist=["x"]).CONFIG_DIR) / "paper-distill.yaml").read_text()
    assert "--recipe train_mix" in text


def test_the_paper_copy_recipe_holds_the_papers_values():
    cfg = _shipped("paper-copy")
    global_batch = cfg["batch_size"] * 8
    assert cfg == {"mode": "copy", "epochs": 100, "batch_size": 256, "lr": pytest.approx(1e-3 * global_batch / 256),
                   "layer_decay": 0.75, "weight_decay": 0.05, "drop_path": 0.0, "student_args": ["global_pool=avg"]}


@pytest.mark.parametrize("name", ["paper-distill", "paper-copy"])
def test_the_shipped_recipes_pass_trains_checks(configs, tmp_path, name):
    result = _invoke([*COMMON, "-c", name, "--student", "vit_tiny_patch16_224", "--out", str(tmp_path / "r"),
                      "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    cfg = _shipped(name)
    assert configs[0].epochs == cfg["epochs"] and configs[0].optim.lr == pytest.approx(cfg["lr"])
    assert configs[0].optim.betas == tuple(cfg.get("betas", (0.9, 0.999)))
    assert configs[0].spec.mode == cfg["mode"] and dict(configs[0].spec.student.model_args) == {"global_pool": "avg"}

"""timm train.py's spellings on `attncache train` (issue 16 item 1): each reaches the very setting
of our spelling (the run's recorded config, student.json's `transfer` and `run`, is identical),
what we cannot do is refused in one line, and `--teacher-checkpoint` replaces `--checkpoint`
with the old spelling still working behind a one-line note."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import TINY_TEACHER

COMMON = ["train", "--data", "d/train-{0..1}.tar", "--num-classes", "4", "--device", "cpu", "--threads", "1",
          "--student", "vit_tiny_patch16_224", "--max-steps", "3"]
PRESET = "rrc(scale=(0.08,1.0))|flip|randaug(n=2,m=9,mstd=0.5,inc=1)|normalize|erase(p=0.25)"


def _invoke(*args):
    from attncache.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _recorded(cfg) -> dict:
    """What student.json records of a run (its id is the digest of these two)."""
    from attncache.pipeline.train.run_identity import run_identity

    return {"transfer": cfg.spec.to_json(), "run": run_identity(cfg)}


def _same(configs, out, timm_args, ours_args):
    for args in (timm_args, ours_args):
        result = _invoke(*COMMON, "--out", out, *args)
        assert result.exit_code == 0, result.output
    assert len(configs) == 2 and _recorded(configs[0]) == _recorded(configs[1]) and configs[0] == configs[1]
    return configs[0]


def _one_error(result, *needles):
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.mark.parametrize("timm_args,ours", [
    (["--aa", "rand-m9-mstd0.5-inc1"], "rrc(scale=(0.08,1.0))|flip|randaug(inc=1,m=9,mstd=0.5,n=2,p=0.5)|normalize|"
                                       "erase(p=0.25)"),
    (["--aa", "rand-m7-n3"], "rrc(scale=(0.08,1.0))|flip|randaug(inc=0,m=7,mstd=0.0,n=3,p=0.5)|normalize|"
                             "erase(p=0.25)"),
    (["--aa", "none"], "rrc(scale=(0.08,1.0))|flip|normalize|erase(p=0.25)"),
    (["--reprob", "0.4"], PRESET.replace("erase(p=0.25)", "erase(p=0.4)")),
    (["--reprob", "0"], PRESET.replace("|erase(p=0.25)", "")),
    (["--hflip", "0.2"], PRESET.replace("|flip|", "|flip(p=0.2)|")),
    (["--scale", "0.2", "1.0"], PRESET.replace("rrc(scale=(0.08,1.0))", "rrc(scale=(0.2, 1.0))")),
    (["--color-jitter", "0.3"], PRESET.replace("|flip|", "|flip|jitter(brightness=0.3,contrast=0.3,saturation=0.3)|")),
])
def test_timm_augmentation_options_are_the_recipe_they_spell(configs, tmp_path, timm_args, ours):
    cfg = _same(configs, tmp_path / "r", timm_args, ["--recipe", ours])
    assert cfg.recipe == ours
    from attncache.pipeline.augment.recipe import RecipeDefaults, parse_recipe

    parse_recipe(cfg.recipe, RecipeDefaults(32, (0.5,) * 3, (0.5,) * 3))  # a recipe the trainer can run


def test_aa_maps_onto_the_presets_own_randaug_draws():
    """`--aa rand-m9-mstd0.5-inc1` on the preset is the preset: the same ops with the same arguments."""
    from attncache.pipeline.augment.recipe import RecipeDefaults, parse_recipe
    from attncache.pipeline.augment.timm_args import TimmAugment, apply_timm_augment

    d = RecipeDefaults(32, (0.5,) * 3, (0.5,) * 3)
    assert parse_recipe(apply_timm_augment("train", TimmAugment(aa="rand-m9-mstd0.5-inc1")), d) == \
        parse_recipe("train", d)


@pytest.mark.parametrize("timm_args,ours", [
    (["--amp", "--amp-dtype", "bfloat16"], ["--amp", "bf16"]),
    (["--amp"], ["--amp", "bf16"]),
    (["--amp-dtype", "bfloat16"], ["--amp", "bf16"]),
    (["--opt", "adamw", "--sched", "cosine"], []),
    (["--opt", "AdamW"], []),
])
def test_timm_run_options_reach_our_setting(configs, tmp_path, timm_args, ours):
    _same(configs, tmp_path / "r", timm_args, ours)


def test_warmup_lr_reaches_the_schedule(configs, tmp_path):
    from attncache.pipeline.train.optim import OptimConfig, WarmupCosine, build_optimizer

    assert _invoke(*COMMON, "--out", tmp_path / "r", "--warmup-lr", "1e-5", "--lr", "1e-3").exit_code == 0
    cfg = configs[0].optim
    assert cfg.warmup_lr == 1e-5 and _recorded(configs[0])["run"]["optim"]["warmup_lr"] == 1e-5
    model = torch.nn.Linear(2, 2)
    schedule = WarmupCosine(build_optimizer(model, cfg), cfg, total_steps=10, warmup_steps=4)
    assert schedule.lr_at(0) == 1e-5 and schedule.lr_at(2) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    # at its default the run's identity is that of runs recorded before the option (no key)
    assert _invoke(*COMMON, "--out", tmp_path / "s").exit_code == 0
    assert "warmup_lr" not in _recorded(configs[1])["run"]["optim"]
    base = WarmupCosine(build_optimizer(model, OptimConfig()), OptimConfig(), total_steps=10, warmup_steps=4)
    assert base.lr_at(0) == 0.0 and base.lr_at(1) == 1e-3 * 1 / 4


def test_timm_keys_in_a_yaml_config_equal_the_same_options_typed(configs, tmp_path):
    out = tmp_path / "r"
    config = tmp_path / "timm.yaml"
    config.write_text(yaml.safe_dump({"model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "img_size": 32},
                                      "output": str(out), "opt": "adamw", "sched": "cosine", "warmup_lr": 1e-5,
                                      "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.3, "hflip": 0.4, "scale": [0.2, 1.0],
                                      "color_jitter": 0.2, "amp": True, "amp_dtype": "bfloat16", "opt_betas": [0.9, 0.95]}))
    typed = ["--student-arg", "depth=2", "--student-arg", "img_size=32", "--warmup-lr", "1e-5", "--aa",
             "rand-m9-mstd0.5-inc1", "--reprob", "0.3", "--hflip", "0.4", "--scale", "0.2", "1.0", "--color-jitter",
             "0.2", "--amp", "bf16", "--opt-betas", "0.9", "0.95"]
    for args in (["--out", out, *typed], ["-c", config]):
        result = _invoke(*COMMON, *args)
        assert result.exit_code == 0, result.output
    assert _recorded(configs[0]) == _recorded(configs[1]) and configs[0] == configs[1]
    assert configs[0].amp == "bf16" and "erase(p=0.3)" in configs[0].recipe


def test_amp_false_in_a_config_is_no_autocast(configs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("amp: false\n")
    _same(configs, tmp_path / "r", ["-c", config], ["--amp", "none"])


@pytest.mark.parametrize("args,needles", [
    (["--opt", "sgd"], ["--opt", "'sgd'", "supported: adamw"]),
    (["--sched", "step"], ["--sched", "supported: cosine"]),
    (["--amp-dtype", "float16"], ["float16", "loss scaler", "bfloat16"]),
    (["--amp", "none", "--amp-dtype", "bfloat16"], ["contradict"]),
    (["--aa", "original"], ["--aa 'original'", "RandAugment"]),
    (["--aa", "rand-m9-tweights"], ["'tweights'"]),
    (["--aa", "rand-m9-mstd101"], ["mstd > 100"]),
    (["--aa", "rand-m9-x3"], ["'x3'"]),
    (["--scale", "0.2", "1.0", "--recipe", "eval"], ["--scale", "no rrc op"]),
    (["--reprob", "1.5"], ["--reprob"]),
])
def test_what_timm_options_cannot_express_is_refused_in_one_line(configs, tmp_path, args, needles):
    _one_error(_invoke(*COMMON, "--out", tmp_path / "r", *args), *needles)
    assert not configs


@pytest.mark.parametrize("args", [["--aa", "rand-m9"], ["--reprob", "0.3"], ["--hflip", "0"], ["--scale", "0.5", "1"],
                                  ["--color-jitter", "0.4"], ["--aa", "rand-m9", "--reprob", "0.1"]])
def test_timm_augmentation_is_refused_with_a_cache_which_fixed_it(configs, tmp_path, args):
    line = _one_error(_invoke(*COMMON, "--out", tmp_path / "r", "--cache", tmp_path / "c.zarr", *args),
                      "the cache fixes the augmentation at precompute")
    assert all(a in line for a in args if a.startswith("--"))
    assert not configs


# --------------------------------------------------------------------------- --teacher-checkpoint


def test_teacher_checkpoint_and_its_old_spelling_reach_the_same_config(configs, tmp_path):
    weights = tmp_path / "w.safetensors"
    from attncache.cli.main import cli

    runs = []
    for flag in ("--teacher-checkpoint", "--checkpoint"):
        runs.append(CliRunner().invoke(cli, [*COMMON, "--out", str(tmp_path / "r"), "--mode", "finetune",
                                             "--teacher", "vit_tiny_patch16_224", flag, str(weights)]))
        assert runs[-1].exit_code == 0, runs[-1].output
    assert configs[0] == configs[1] and configs[0].spec.teacher.checkpoint == str(weights)
    note = "--checkpoint (the teacher's weights) is deprecated: use --teacher-checkpoint"
    assert note not in runs[0].stderr and runs[1].stderr.count(note) == 1
    assert len([l for l in runs[1].stderr.splitlines() if "deprecated" in l]) == 1


def test_the_old_teacher_spelling_in_a_config_and_a_conflict(configs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {tmp_path / 'a.pth'}\n")
    base = [*COMMON, "--out", tmp_path / "r", "--teacher", "vit_tiny_patch16_224", "--mode", "finetune"]
    result = _invoke(*base, "-c", config)
    assert result.exit_code == 0, result.output
    assert configs[0].spec.teacher.checkpoint == str(tmp_path / "a.pth") and result.stderr.count("deprecated") == 1
    for args in (["--checkpoint", "a.pth", "--teacher-checkpoint", "b.pth"],
                 ["--teacher-checkpoint", "b.pth", "--checkpoint", "a.pth"]):
        _one_error(_invoke(*base, *args), "two teacher weights")


def test_precompute_and_verify_take_teacher_checkpoint_and_note_the_old_one(tmp_path):
    from attncache.cli.main import cli

    for command in (["precompute", "--data", "nothing-{0..1}.tar", "--teacher", "vit_tiny_patch16_224", "--out",
                     str(tmp_path / "s.zarr")], ["verify", str(tmp_path / "missing.zarr"), "--recompute", "1",
                                                 "--teacher", "vit_tiny_patch16_224"]):
        new = CliRunner().invoke(cli, [*command, "--teacher-checkpoint", str(tmp_path / "w.pth")])
        old = CliRunner().invoke(cli, [*command, "--checkpoint", str(tmp_path / "w.pth")])
        assert "no such option" not in new.output.lower() and "no such option" not in old.output.lower()
        assert old.stderr.count("is deprecated: use --teacher-checkpoint") == 1 and "deprecated" not in new.stderr
        assert new.exit_code == old.exit_code != 0  # both fail later, at the same check (no data / no store)


# ------------------------------------------------------------------------------------------ --resume


def _fake_run(run):
    run.mkdir()
    name = "checkpoint-00000002-" + "0" * 16 + ".safetensors"
    (run / name).write_bytes(b"x")
    state = {"step": 2, "epoch": 0, "step_in_epoch": 2, "samples": 16, "epoch_samples": 16, "format": 2,
             "run": "r", "checkpoint": name, "checkpoint_sha256": "0" * 64, "param_groups": [], "metrics_bytes": 0}
    (run / "state.json").write_text(json.dumps(state))
    return run / name


def test_resume_a_checkpoint_is_rerunning_in_its_run_directory(configs, tmp_path):
    checkpoint = _fake_run(tmp_path / "run")
    for resume in (checkpoint, tmp_path / "run" / "state.json", tmp_path / "run"):
        assert _invoke(*COMMON, "--resume", resume).exit_code == 0
    assert _invoke(*COMMON, "--resume", checkpoint, "--out", tmp_path / "run").exit_code == 0
    assert _invoke(*COMMON, "--out", tmp_path / "run").exit_code == 0
    assert len(configs) == 5 and all(c == configs[-1] for c in configs)


def test_resume_refuses_what_is_not_a_committed_checkpoint_of_this_run(configs, tmp_path):
    from attncache.cli.main import cli

    checkpoint = _fake_run(tmp_path / "run")
    (tmp_path / "timm.pth.tar").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    old = tmp_path / "run" / ("checkpoint-00000001-" + "1" * 16 + ".safetensors")
    old.write_bytes(b"x")
    cases = [(tmp_path / "timm.pth.tar", "use --initial-checkpoint"), (tmp_path / "empty", "nothing to resume"),
             (old, "not the run's committed checkpoint"), (tmp_path / "nope", "no such file")]
    for path, needle in cases:
        result = CliRunner().invoke(cli, [*COMMON, "--resume", str(path)])
        assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output, result.output
    _one_error(_invoke(*COMMON, "--resume", checkpoint, "--out", tmp_path / "elsewhere"), "resumes in its own directory")
    _one_error(_invoke(*COMMON), "give --out")
    assert not configs


def test_resume_of_another_runs_checkpoint_is_refused_naming_what_differs(synth_data, tmp_path):
    """A real run: `--resume` its checkpoint with other options is refused (another run), with its
    own options it resumes (and has nothing left to do)."""
    from attncache.cli.main import cli

    student = ["--student", TINY_TEACHER["model"]] + [a for k, v in TINY_TEACHER["model_args"].items()
                                                      if k != "num_classes" for a in ("--student-arg", f"{k}={v}")]
    args = ["train", "--data", synth_data["train"], "--batch-size", "32", "--workers", "0", "--threads", "2",
            "--quiet", "--mode", "scratch", "--max-steps", "2", *student]
    first = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run")])
    assert first.exit_code == 0, first.output
    checkpoint = next((tmp_path / "run").glob("checkpoint-*.safetensors"))
    other = CliRunner().invoke(cli, [*args, "--resume", str(checkpoint), "--lr", "0.01"])
    assert other.exit_code == 1 and "holds another run" in other.output and "--lr 0.001 there, 0.01 now" in other.output
    again = CliRunner().invoke(cli, [*args, "--resume", str(checkpoint), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 2


# ------------------------------------------------------------------------------ --initial-checkpoint


def test_initial_checkpoint_starts_the_student_from_those_weights(tmp_path):
    from attncache.pipeline.train.session import TransferSpec, build_session
    from attncache.pipeline.train.student import StudentConfig, StudentMismatch, build_student

    args = tuple(sorted((k, v) for k, v in TINY_TEACHER["model_args"].items() if k != "num_classes"))
    donor = build_student(StudentConfig(TINY_TEACHER["model"], args, 4, seed=7)).state_dict()
    save_file({k: v.contiguous() for k, v in donor.items()}, tmp_path / "w.safetensors")
    torch.save(donor, tmp_path / "w.pth")
    for path in ("w.safetensors", "w.pth"):
        spec = TransferSpec(StudentConfig(TINY_TEACHER["model"], args, 4, seed=0,
                                          initial_checkpoint=str(tmp_path / path)), "scratch")
        model = build_session(spec, "cpu").model
        assert all(torch.equal(v, donor[k]) for k, v in model.state_dict().items())
        assert TransferSpec.from_json(spec.to_json()) == spec
    assert "initial_checkpoint" not in TransferSpec(StudentConfig("x", args, 4), "scratch").to_json()["student"]
    wrong = StudentConfig(TINY_TEACHER["model"], args, 10, initial_checkpoint=str(tmp_path / "w.safetensors"))
    with pytest.raises(StudentMismatch, match=r"does not fit student .* shapes differ \['head.bias \(4,\) != \(10,\)"):
        build_student(wrong)
    with pytest.raises(StudentMismatch, match="--initial-checkpoint: checkpoint .* does not exist"):
        build_student(StudentConfig(TINY_TEACHER["model"], args, 4, initial_checkpoint=str(tmp_path / "no.pth")))


def test_initial_checkpoint_reaches_the_recorded_config(configs, tmp_path):
    assert _invoke(*COMMON, "--out", tmp_path / "r", "--initial-checkpoint", tmp_path / "w.pth").exit_code == 0
    assert _recorded(configs[0])["transfer"]["student"]["initial_checkpoint"] == str(tmp_path / "w.pth")

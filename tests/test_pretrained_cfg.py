"""Preprocessing from the model's pretrained config (issue 16 item 3): the train and eval recipes
take mean, std, interpolation and the eval crop from timm's `pretrained_cfg`, never from numbers of
ours, and a checkpoint whose name says it is another tag's (an MAE checkpoint under the bare
`vit_large_patch16_224`) is warned about once, with the fix. Local random-init models only."""
import json
import math

import pytest
from safetensors.torch import save_file

from attncache.pipeline.teacher.model import Teacher, TeacherConfig
from attncache.pipeline.teacher.pretrained import normalisation_hint

OVERLAY = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "crop_pct": 0.8, "interpolation": "bilinear"}
TINY = (("depth", 2), ("embed_dim", 32), ("img_size", 32), ("num_heads", 2), ("patch_size", 8))
HEADLESS = (*TINY, ("num_classes", 0))  # an MAE encoder has no head
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _ops(recipe) -> dict:
    return {op.name: op.kwargs for op in recipe.ops}


def test_a_teachers_pretrained_config_gives_the_train_and_eval_recipes(synth_data):
    from attncache.pipeline.train.session import TransferSpec, build_session, eval_stream
    from attncache.pipeline.train.student import StudentConfig

    teacher = TeacherConfig("vit_tiny_patch16_224", TINY + (("pretrained_cfg_overlay", OVERLAY),), random_init=True)
    defaults = Teacher(teacher).recipe_defaults()
    assert (defaults.mean, defaults.std, defaults.crop_pct, defaults.interpolation) == \
        ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.8, "bilinear")
    spec = TransferSpec(StudentConfig("vit_tiny_patch16_224", TINY, 4), "distill", "0:1", teacher=teacher)
    session = build_session(spec, "cpu")
    train, evaluation = _ops(session.recipe), _ops(session.eval_recipe)
    assert train["normalize"] == evaluation["normalize"] == {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    assert train["rrc"]["interpolation"] == evaluation["resize"]["interpolation"] == "bilinear"
    assert evaluation["resize"]["size"] == math.floor(32 / 0.8) and evaluation["center_crop"]["size"] == 32
    stream, _ = eval_stream(session, 4, None, (synth_data["val"],))
    assert list(stream.recipe_json) == session.eval_recipe.to_json()


def test_without_a_teacher_the_students_pretrained_config_gives_them():
    from attncache.pipeline.train.session import TransferSpec, build_session
    from attncache.pipeline.train.student import StudentConfig

    spec = TransferSpec(StudentConfig("vit_tiny_patch16_224", TINY + (("pretrained_cfg_overlay", OVERLAY),), 4),
                        "scratch")
    session = build_session(spec, "cpu")
    assert _ops(session.eval_recipe)["resize"]["size"] == 40 and _ops(session.recipe)["normalize"]["std"] == \
        (0.4, 0.5, 0.6)


def test_a_run_records_its_eval_recipe_and_evaluate_uses_it(synth_data, tmp_path):
    from click.testing import CliRunner

    from attncache.cli.main import cli
    from attncache.pipeline.augment.recipe import Recipe
    from attncache.pipeline.train.session import load_run

    args = [a for k, v in TINY for a in ("--student-arg", f"{k}={v}")]
    result = CliRunner().invoke(cli, ["train", "--data", synth_data["train"], "--out", str(tmp_path / "r"), "--quiet",
                                      "--student", "vit_tiny_patch16_224", *args, "--student-arg",
                                      "pretrained_cfg_overlay=" + json.dumps(OVERLAY), "--mode", "scratch",
                                      "--max-steps", "1", "--batch-size", "16", "--workers", "0", "--threads", "2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "student.json").read_text())
    recorded = Recipe.from_json(saved["eval_recipe"])
    assert _ops(recorded)["resize"] == {"size": 40, "interpolation": "bilinear"}
    session = load_run(str(tmp_path / "r"), "cpu")[0]
    assert session.eval_recipe == recorded


def test_an_mae_checkpoint_under_the_bare_name_gets_the_fix():
    hint = normalisation_hint("vit_large_patch16_224", "/ckpt/mae_pretrain_vit_large.pth")
    assert "--teacher vit_large_patch16_224.mae" in hint and str(IMAGENET[0]) in hint and "(0.5, 0.5, 0.5)" in hint
    assert f"normalize(mean={IMAGENET[0]},std={IMAGENET[1]})" in hint
    assert normalisation_hint("vit_large_patch16_224", "weights.pth") is None  # no tag in the name
    assert normalisation_hint("vit_large_patch16_224.mae", "mae_pretrain_vit_large.pth") is None  # tag given
    assert normalisation_hint("vit_large_patch16_224", "vit_large_augreg_in21k_ft_in1k.pth") is None  # default tag
    assert normalisation_hint("vit_large_patch16_224", None) is None


@pytest.fixture
def mae_checkpoint(tmp_path):
    model = Teacher(TeacherConfig("vit_large_patch16_224", HEADLESS, random_init=True)).model
    path = tmp_path / "mae_pretrain_vit_large.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return str(path)


def test_the_mismatch_warns_once_and_the_tag_fixes_it(mae_checkpoint, capsys):
    teacher = Teacher(TeacherConfig("vit_large_patch16_224", HEADLESS, checkpoint=mae_checkpoint))
    assert teacher.recipe_defaults().mean == (0.5, 0.5, 0.5)
    teacher.recipe_defaults()
    Teacher(TeacherConfig("vit_large_patch16_224", HEADLESS, checkpoint=mae_checkpoint)).recipe_defaults()
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and "give --teacher vit_large_patch16_224.mae" in lines[0], lines
    fixed = Teacher(TeacherConfig("vit_large_patch16_224.mae", HEADLESS, checkpoint=mae_checkpoint)).recipe_defaults()
    assert (fixed.mean, fixed.std) == IMAGENET
    assert "warning" not in capsys.readouterr().err

"""A student trained from a cache evaluates raw --eval-data with its teacher's pretrained eval crop
(issue 16 item 3): train loads no teacher then, so the crop and interpolation come from the teacher
the store records (name and arguments, no new store field: the cache id and bytes stay), equal to
the online teacher's and to `precompute --recipe eval`'s. Before, a cached run always cropped with
0.875 whatever the teacher's config said (vit_tiny_patch16_224's says 0.9)."""
import json
import math

import pytest
from click.testing import CliRunner

from attncache.pipeline.teacher.model import TeacherConfig

OVERLAY = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "crop_pct": 0.8, "interpolation": "bilinear"}
TINY = (("depth", 2), ("embed_dim", 32), ("img_size", 32), ("num_heads", 2), ("patch_size", 8))
TEACHER = TeacherConfig("vit_tiny_patch16_224", TINY + (("pretrained_cfg_overlay", OVERLAY),), random_init=True)
RECIPE = "rrc(scale=(0.35,1.0))|flip|normalize"


def _ops(recipe) -> dict:
    return {op.name: op.kwargs for op in recipe.ops}


def _precompute(data: str, out, recipe: str) -> str:
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute

    run_precompute(PrecomputeConfig(data=(data,), out=str(out), teacher=TEACHER, recipe=recipe, layers="0:1",
                                    batch_size=32, workers=0, threads=1, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def stores(synth_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcrop")
    train = synth_data["train"].replace("{000000..000003}", "000000")
    val = synth_data["val"].replace("{000000..000000}", "000000")
    return {"train": train, "val": val, "cache": _precompute(train, tmp / "c.zarr", RECIPE),
            "eval": _precompute(val, tmp / "e.zarr", "eval"),
            "other_eval": _precompute(val, tmp / "o.zarr", "resize(size=32)|center_crop|normalize")}


def _spec(**source):
    from attncache.pipeline.train.session import TransferSpec
    from attncache.pipeline.train.student import StudentConfig

    return TransferSpec(StudentConfig("vit_tiny_patch16_224", TINY, 4), "distill", "0:1", **source)


def test_a_cached_run_evaluates_with_the_teachers_crop_as_online_and_as_the_eval_cache(stores):
    from attncache.pipeline.augment.recipe import Recipe
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.train.session import build_session

    cached = build_session(_spec(cache=stores["cache"]), "cpu")
    ops = _ops(cached.eval_recipe)
    assert ops["resize"] == {"size": math.floor(32 / 0.8), "interpolation": "bilinear"}  # not floor(32 / 0.875) = 36
    assert ops["center_crop"] == {"size": 32} and ops["normalize"] == {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    online = build_session(_spec(teacher=TEACHER), "cpu")
    assert cached.eval_recipe.to_json() == online.eval_recipe.to_json()
    eval_cache = Recipe.from_json(CacheStore.open(stores["eval"]).meta["recipe"]["ops"])
    assert cached.eval_recipe.to_json() == eval_cache.to_json()


def test_the_cached_runs_eval_recipe_is_recorded_and_evaluate_uses_it(stores, tmp_path):
    from attncache.cli.main import cli
    from attncache.pipeline.augment.recipe import Recipe
    from attncache.pipeline.train.session import load_run

    args = [a for k, v in TINY for a in ("--student-arg", f"{k}={v}")]
    result = CliRunner().invoke(cli, ["train", "--data", stores["train"], "--cache", stores["cache"], "--out",
                                      str(tmp_path / "r"), "--student", "vit_tiny_patch16_224", *args, "--layers", "0:1",
                                      "--eval-data", stores["val"], "--max-steps", "1", "--batch-size", "16",
                                      "--workers", "0", "--threads", "1", "--num-classes", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    recorded = Recipe.from_json(json.loads((tmp_path / "r" / "student.json").read_text())["eval_recipe"])
    assert _ops(recorded)["resize"] == {"size": 40, "interpolation": "bilinear"}
    assert load_run(str(tmp_path / "r"), "cpu")[0].eval_recipe == recorded


def test_an_eval_cache_with_another_crop_is_used_and_said_in_one_line(stores, capsys):
    from attncache.pipeline.augment.recipe import Recipe
    from attncache.pipeline.train.session import build_session, eval_stream

    session = build_session(_spec(cache=stores["cache"]), "cpu")
    capsys.readouterr()
    eval_stream(session, 4, stores["eval"], ())  # the teacher's own eval recipe: nothing to say
    assert capsys.readouterr().err == ""
    stream, _ = eval_stream(session, 4, stores["other_eval"], ())
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "note: eval cache" in lines[0] and stores["other_eval"] in lines[0]
    assert "resize to 32 (bilinear), centre crop 32" in lines[0] and "(resize to 40 (bilinear), centre crop 32)" in lines[0]
    assert _ops(Recipe.from_json(list(stream.recipe_json)))["resize"]["size"] == 32  # the eval cache's is replayed


def test_a_store_whose_teacher_cannot_be_built_falls_back_to_the_old_crop_in_one_line(capsys):
    from attncache.pipeline.augment.recipe import RecipeDefaults, parse_recipe
    from attncache.pipeline.train.evaluate import eval_recipe_like
    from attncache.pipeline.train.session import store_teacher_defaults

    defaults = store_teacher_defaults({"teacher": {"name": "vit_no_such_model", "model_args": {}},
                                       "recipe": {"output_size": 32}})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "vit_no_such_model" in lines[0] and "0.875" in lines[0]
    train = parse_recipe(RECIPE, RecipeDefaults(32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), interpolation="bilinear"))
    assert eval_recipe_like(train, defaults.crop_pct, defaults.interpolation).to_json() == \
        eval_recipe_like(train).to_json()  # what every cached run got before



def test_a_resumed_run_evaluates_as_its_student_json_recorded(stores, tmp_path):
    """A run recorded before cached runs recorded an eval recipe keeps the crop it evaluated with
    (and that `evaluate RUN` uses for it); one that recorded it keeps that; a new run takes its own."""
    from attncache.pipeline.train.evaluate import eval_recipe_like
    from attncache.pipeline.train.run_identity import recorded_eval_recipe
    from attncache.pipeline.train.session import build_session

    own = build_session(_spec(cache=stores["cache"]), "cpu").eval_recipe
    assert recorded_eval_recipe(tmp_path / "new", own) is own
    run = tmp_path / "old"
    run.mkdir()
    record = {"transfer": _spec(cache=stores["cache"]).to_json(), "run": {}, "recipe": own.to_json()}
    (run / "student.json").write_text(json.dumps(record))
    assert recorded_eval_recipe(run, own) is None  # eval_stream then uses eval_recipe_like(recipe), as before
    assert _ops(eval_recipe_like(build_session(_spec(cache=stores["cache"]), "cpu").recipe))["resize"]["size"] == 36
    (run / "student.json").write_text(json.dumps(dict(record, eval_recipe=own.to_json())))
    assert recorded_eval_recipe(run, None).to_json() == own.to_json()

"""Augmentation: parameters drawn once per (seed, key, view), replayed bit for bit, no global RNG."""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from attncache.pipeline.augment.recipe import PRESETS, Recipe, RecipeDefaults, parse_recipe

DEFAULTS = RecipeDefaults(image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CUSTOM = "rrc(scale=(0.2,1.0),interpolation='random')|flip(p=0.5)|jitter(brightness=0.4,contrast=0.4,saturation=0.4,hue=0.1)|randaug(n=3,m=12,mstd=1.0,inc=0,mmax=15)|normalize|erase(p=0.9)"


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


SIZES = [(1, 1), (7, 300), (500, 40), (32, 32), (64, 48)]


@pytest.mark.parametrize("spec", ["train", CUSTOM])
def test_replay_from_stored_params_is_bit_identical(spec):
    recipe = parse_recipe(spec, DEFAULTS)
    for i in range(20):
        image = _image(*SIZES[i % len(SIZES)], seed=i)
        params, pixels = recipe.draw_and_apply(image, seed=5, key=f"k{i}", view=i % 3)
        assert params.dtype == np.float64 and params.shape == (recipe.num_params,)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert torch.equal(recipe.apply(params, image), pixels)


def test_params_are_a_function_of_seed_key_and_view():
    recipe = parse_recipe("train", DEFAULTS)
    image = _image(64, 48)
    p = recipe.draw_and_apply(image, 0, "a", 0)[0]
    assert np.array_equal(p, recipe.draw_and_apply(image, 0, "a", 0)[0])
    for other in [(1, "a", 0), (0, "b", 0), (0, "a", 1)]:
        assert not np.array_equal(p, recipe.draw_and_apply(image, *other)[0]), other


def test_global_random_state_has_no_effect():
    recipe = parse_recipe(CUSTOM, DEFAULTS)
    image = _image(50, 40)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    p1, x1 = recipe.draw_and_apply(image, 3, "key", 2)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    random.random(), np.random.rand(), torch.rand(3)
    p2, x2 = recipe.draw_and_apply(image, 3, "key", 2)
    assert np.array_equal(p1, p2) and torch.equal(x1, x2)


def test_layout_records_every_randaug_choice():
    recipe = parse_recipe("train", DEFAULTS)
    layout = recipe.param_layout()
    assert sum(part["length"] for part in layout) == recipe.num_params
    ra = next(part for part in layout if part["op"] == "randaug")
    assert ra["fields"] == ["op0", "applied0", "magnitude0", "sign0", "op1", "applied1", "magnitude1", "sign1"]
    seen_ops, seen_applied = set(), set()
    for i in range(200):
        params = recipe.draw_and_apply(_image(40, 40), 0, f"s{i}", 0)[0]
        slots = params[ra["offset"]:ra["offset"] + ra["length"]].reshape(-1, 4)
        assert ((slots[:, 2] >= 0) & (slots[:, 2] <= 10)).all()
        assert set(slots[:, 3]) <= {-1.0, 1.0}
        seen_ops |= set(slots[:, 0].astype(int))
        seen_applied |= set(slots[:, 1])
    assert seen_ops == set(range(15)) and seen_applied == {0.0, 1.0}


def test_eval_recipe_draws_nothing_and_matches_torchvision():
    recipe = parse_recipe("eval", DEFAULTS)
    assert not recipe.is_random and recipe.num_params == 0
    image = _image(70, 50)
    params, pixels = recipe.draw_and_apply(image, 0, "x", 0)
    assert params.shape == (0,)
    ref = TF.center_crop(TF.resize(image, 36, interpolation=TF.InterpolationMode.BICUBIC), [32, 32])
    ref = TF.normalize(TF.pil_to_tensor(ref).float() / 255, DEFAULTS.mean, DEFAULTS.std)
    assert torch.equal(pixels, ref)


def test_erasing_writes_the_noise_of_its_stored_seed():
    recipe = parse_recipe("center_crop|normalize|erase(p=1.0)", DEFAULTS)
    plain = parse_recipe("center_crop|normalize", DEFAULTS)
    image = _image(32, 32)
    params, pixels = recipe.draw_and_apply(image, 0, "e", 0)
    applied, top, left, h, w, noise_seed = (int(v) for v in params)
    assert applied == 1 and h > 0 and w > 0
    noise = np.random.default_rng(noise_seed).standard_normal((3, h, w), dtype=np.float32)
    assert torch.equal(pixels[:, top:top + h, left:left + w], torch.from_numpy(noise))
    base = plain.apply(np.zeros(0), image)
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[:, top:top + h, left:left + w] = False
    assert torch.equal(pixels[mask], base[mask])


def test_recipe_json_and_spec_round_trip():
    recipe = parse_recipe(CUSTOM, DEFAULTS)
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe
    assert parse_recipe(recipe.describe(), RecipeDefaults(224, (0, 0, 0), (1, 1, 1))) == recipe
    image = _image(40, 30)
    params, pixels = recipe.draw_and_apply(image, 1, "r", 0)
    assert torch.equal(again.apply(params, image), pixels)


def test_teacher_config_fills_size_mean_and_interpolation():
    recipe = parse_recipe("train", RecipeDefaults(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation="bilinear"))
    ops = {d["op"]: d["args"] for d in recipe.to_json()}
    assert ops["rrc"]["size"] == 48 and ops["rrc"]["interpolation"] == "bilinear"
    assert ops["normalize"]["mean"] == [0.5, 0.5, 0.5] and recipe.output_size == 48
    assert PRESETS["train"].startswith("rrc")


@pytest.mark.parametrize("spec,message", [
    ("rrc|flip|warp|normalize", "warp"),
    ("rrc(zoom=2)|normalize", "zoom"),
    ("rrc|flip", "normalize"),
    ("rrc|erase|normalize", "erase"),
    ("flip|normalize", "rrc"),
    ("rrc|normalize|flip", "flip"),
    ("rrc|jitter(hue=0.9)|normalize", r"jitter: hue=0\.9 must be in \[0, 0\.5\]"),
    ("rrc|jitter(hue=-0.1)|normalize", "jitter: hue"),
    ("rrc|jitter(brightness=-1)|normalize", "jitter: brightness=-1"),
    ("rrc|jitter(contrast=-0.5)|normalize", "jitter: contrast=-0.5"),
])
def test_bad_recipes_are_refused_naming_the_op(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(spec, DEFAULTS)


def test_jitter_hue_at_its_bound_draws_and_applies_without_error():
    """hue = 0.5 is torchvision's own bound: accepted, and every drawn factor applies."""
    recipe = parse_recipe("rrc|jitter(hue=0.5)|normalize", DEFAULTS)
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    for key in range(20):
        params, pixels = recipe.draw_and_apply(image, 0, f"k{key}", 0)
        assert torch.equal(recipe.apply(params, image), pixels) and pixels.shape[0] == 3

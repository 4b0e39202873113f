"""Mixup/CutMix drawn at precompute time within a unit: the teacher saw the mixed image, replay rebuilds it."""
import io
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.mixup import mixup_target, rand_bbox

from attncache.pipeline.augment import mix
from attncache.pipeline.augment.mix import apply_mix, draw_mix, fill_mix_params, mix_targets, replay_unit
from attncache.pipeline.augment.recipe import Recipe, RecipeDefaults, parse_recipe
from attncache.pipeline.data.shards import decode_sample, iter_shard
from attncache.pipeline.precompute.job import PrecomputeConfig
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.precompute.units import prepare_unit
from attncache.pipeline.store.cache import CacheStore, Unit
from attncache.pipeline.teacher.model import Teacher, TeacherConfig

DEFAULTS = RecipeDefaults(image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
TEACHER = TeacherConfig("vit_tiny_patch16_224", (("depth", 3), ("embed_dim", 48), ("img_size", 32),
                                                  ("num_heads", 3), ("patch_size", 8)), random_init=True, seed=0)
KEYS = [f"s{i:03d}" for i in range(40)]
POSITIONS = list(range(0, 80, 2))  # usable positions need not be contiguous


def _cols(recipe, aug):
    return np.asarray(aug)[:, mix.mix_columns(recipe)]


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("spec", ["rrc|normalize|mix|erase", "rrc|mix|normalize", "rrc|normalize|mix|mix",
                                  "mix|rrc|normalize"])
def test_mix_must_be_the_single_last_op(spec):
    with pytest.raises(ValueError, match="'mix' mixes pairs of samples.*last op"):
        parse_recipe(spec, DEFAULTS)


def test_mix_needs_one_positive_alpha_and_takes_timm_defaults():
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        parse_recipe("rrc|normalize|mix(mixup_alpha=0.0,cutmix_alpha=0.0)", DEFAULTS)
    recipe = parse_recipe("train_mix", DEFAULTS)
    assert recipe.to_json()[-1] == {"op": "mix", "args": {"cutmix_alpha": 1.0, "mixup_alpha": 0.8, "prob": 1.0,
                                                          "switch_prob": 0.5}}
    assert recipe.param_layout()[-1]["fields"] == list(mix.MIX_FIELDS)
    assert recipe.has_pairs and not parse_recipe("train", DEFAULTS).has_pairs
    assert Recipe.from_json(recipe.to_json()) == recipe and parse_recipe(recipe.describe(), DEFAULTS) == recipe


def test_per_sample_draw_and_apply_treat_mix_as_identity_with_zero_params():
    with_mix, plain = parse_recipe("train_mix", DEFAULTS), parse_recipe("train", DEFAULTS)
    image = _image(50, 40)
    params, pixels = with_mix.draw_and_apply(image, 3, "k", 1)
    ref_params, ref_pixels = plain.draw_and_apply(image, 3, "k", 1)
    assert params.shape == (plain.num_params + 8,)
    assert np.array_equal(params[:plain.num_params], ref_params) and not params[plain.num_params:].any()
    assert torch.equal(pixels, ref_pixels) and torch.equal(with_mix.apply(params, image), pixels)


# ---------------------------------------------------------------------------------------------- drawing


def test_draws_are_a_pure_function_of_seed_key_view_and_usable_positions():
    recipe = parse_recipe("train_mix", DEFAULTS)
    rows = draw_mix(recipe, 0, 0, KEYS, POSITIONS)
    assert rows.shape == (40, 8) and rows.dtype == np.float64
    assert np.array_equal(rows, draw_mix(recipe, 0, 0, KEYS, POSITIONS))
    order = np.random.default_rng(1).permutation(40)  # the caller's order does not matter
    shuffled = draw_mix(recipe, 0, 0, [KEYS[i] for i in order], [POSITIONS[i] for i in order])
    assert np.array_equal(shuffled, rows[order])
    for other in [(1, 0), (0, 1)]:  # another seed or view: other partners and weights
        again = draw_mix(recipe, *other, KEYS, POSITIONS)
        assert (again[:, 1] != rows[:, 1]).sum() > 20 and (again[:, 2] != rows[:, 2]).sum() > 20, other


def test_partners_are_other_usable_samples_and_lam_is_a_weight():
    recipe = parse_recipe("train_mix", DEFAULTS)
    rows = np.concatenate([draw_mix(recipe, 0, v, KEYS, POSITIONS) for v in range(5)])
    own = np.tile(POSITIONS, 5)
    assert (rows[:, 0] == 1).all(), "prob=1 mixes every sample that has a partner"
    assert set(rows[:, 1]) <= set(POSITIONS) and (rows[:, 1] != own).all()
    assert ((rows[:, 2] >= 0) & (rows[:, 2] <= 1)).all()
    assert set(rows[:, 3]) == {0.0, 1.0}
    lone = draw_mix(recipe, 0, 0, ["alone"], [7])
    assert lone[0, 0] == 0 and lone[0, 1] == 7
    never = draw_mix(parse_recipe("rrc|normalize|mix(prob=0.0)", DEFAULTS), 0, 0, KEYS, POSITIONS)
    assert not never[:, 0].any()
    only_mixup = draw_mix(parse_recipe("rrc|normalize|mix(cutmix_alpha=0.0)", DEFAULTS), 0, 0, KEYS, POSITIONS)
    assert not only_mixup[:, 3].any() and not only_mixup[:, 4:].any()


def test_cutmix_lam_is_one_minus_the_box_area_and_the_box_is_timms():
    recipe = parse_recipe("rrc|normalize|mix(mixup_alpha=0.0,cutmix_alpha=1.0)", DEFAULTS)
    rows = np.concatenate([draw_mix(recipe, 0, v, KEYS, POSITIONS) for v in range(5)])
    assert (rows[:, 3] == 1).all()
    top, left, h, w = rows[:, 4:].T
    assert ((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all()
    assert np.allclose(rows[:, 2], 1 - h * w / 32 ** 2, rtol=0, atol=1e-15)
    assert (h * w > 0).sum() > 100
    for trial in range(50):  # the box formula against timm's rand_bbox for the same lam and centre
        lam = float(np.random.default_rng(trial).beta(1, 1))
        np.random.seed(trial)
        yl, yh, xl, xh = rand_bbox((3, 32, 24), lam)
        np.random.seed(trial)
        cy, cx = np.random.randint(0, 32), np.random.randint(0, 24)
        assert mix._box(32, 24, lam, cy, cx) == (yl, xl, yh - yl, xh - xl)


# ---------------------------------------------------------------------------------------------- applying


def _hand_rows(recipe):
    """Positions 3, 7, 9: 3 mixes with 9 (lam 0.25), 7 gets 3's box (rows 1:3, column 2), 9 is left alone."""
    mix_B8 = np.array([[1, 9, 0.25, 0, 0, 0, 0, 0], [1, 3, 0.875, 1, 1, 2, 2, 1], [0, 9, 1, 0, 0, 0, 0, 0]])
    return fill_mix_params(recipe, np.zeros((3, recipe.num_params)), mix_B8)


def test_mixup_and_cutmix_pixels_by_hand():
    recipe = parse_recipe("rrc|normalize|mix", DEFAULTS)
    aug = _hand_rows(recipe)
    x3, x7, x9 = torch.full((3, 4, 4), 1.0), torch.arange(48.0).view(3, 4, 4), torch.full((3, 4, 4), 5.0)
    out = apply_mix(recipe, aug, [3, 7, 9], torch.stack([x3, x7, x9]))
    assert torch.equal(out[0], torch.full((3, 4, 4), 4.0))  # 0.25 * 1 + 0.75 * 5
    expected7 = x7.clone()
    expected7[:, 1, 2] = 1.0
    expected7[:, 2, 2] = 1.0
    assert torch.equal(out[1], expected7) and torch.equal(out[2], x9)
    assert torch.equal(x7, torch.arange(48.0).view(3, 4, 4)), "the unmixed images stay unmixed"
    flipped = apply_mix(recipe, aug[::-1], [9, 7, 3], [x9, x7, x3])  # row order does not matter
    assert torch.equal(flipped, out.flip(0))
    with pytest.raises(KeyError, match="position 9"):
        apply_mix(recipe, aug[:2], [3, 7], [x3, x7])


def test_targets_mix_smoothed_one_hots_by_hand():
    recipe = parse_recipe("rrc|normalize|mix", DEFAULTS)
    labels = {3: 1, 7: 2, 9: 3}
    t = mix_targets(recipe, _hand_rows(recipe), [3, 7, 9], [1, 2, 3], labels, num_classes=4, smoothing=0.1)
    assert t.dtype == torch.float32 and t.shape == (3, 4)
    # off = 0.1 / 4 = 0.025, on = 0.925; position 3: 0.25 * y(1) + 0.75 * y(3); 7: 0.875 * y(2) + 0.125 * y(1)
    expected = [[0.025, 0.25, 0.025, 0.70], [0.025, 0.1375, 0.8125, 0.025], [0.025, 0.025, 0.025, 0.925]]
    assert torch.allclose(t, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.allclose(t.sum(1), torch.ones(3), atol=1e-6, rtol=0)
    plain = mix_targets(parse_recipe("train", DEFAULTS), np.zeros((2, 20)), [0, 1], [0, 2], {}, 4, 0.2)
    assert torch.allclose(plain, torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]]))
    # two samples that are each other's partner with one lam: timm's flipped-batch mixup_target
    pair = fill_mix_params(recipe, np.zeros((2, recipe.num_params)), np.array([[1, 5, 0.3, 0, 0, 0, 0, 0],
                                                                               [1, 4, 0.3, 0, 0, 0, 0, 0]]))
    ours = mix_targets(recipe, pair, [4, 5], [0, 3], {4: 0, 5: 3}, 4, 0.1)
    assert torch.allclose(ours, mixup_target(torch.tensor([0, 3]), 4, lam=0.3, smoothing=0.1), atol=1e-6)
    with pytest.raises(ValueError, match="misaligned"):
        mix_targets(recipe, pair, [5, 4], [0, 3], {4: 0, 5: 3}, 4, 0.1)


# ---------------------------------------------------------------------------------------------- precompute


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_a_skipped_sample_is_never_a_partner_and_batches_keep_their_boundaries(tmp_path):
    members = []
    for i in range(9):
        data = b"not an image" if i == 2 else _png(_image(40, 36, seed=i))
        members += [(f"m{i}.png", data), (f"m{i}.cls", str(i % 3).encode())]
    url = str(tmp_path / "messy-000000.tar")
    with tarfile.open(url, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with_mix, plain = parse_recipe("train_mix", DEFAULTS), parse_recipe("train", DEFAULTS)
    for view in range(10):
        unit = Unit(view, 0, url)
        mixed, ref = list(prepare_unit(unit, with_mix, 0, 3)), list(prepare_unit(unit, plain, 0, 3))
        assert [b.positions.tolist() for b in mixed] == [b.positions.tolist() for b in ref] == [[0, 1, 3], [4, 5, 6],
                                                                                               [7, 8]]
        def summary(batches):
            return [(b.count, b.last, [(s["position"], s["key"]) for s in b.skipped]) for b in batches]

        assert summary(mixed) == summary(ref) == [(4, False, [(2, "m2")]), (7, False, []), (9, True, [])]
        rows = np.concatenate([_cols(with_mix, b.aug_BP) for b in mixed])
        assert (rows[:, 0] == 1).all() and set(rows[:, 1]) <= {0, 1, 3, 4, 5, 6, 7, 8}
        for b, r in zip(mixed, ref):
            assert np.array_equal(b.aug_BP[:, :plain.num_params], r.aug_BP)


def test_replayed_unit_equals_what_the_teacher_saw_and_samples_are_mixed(tmp_path, monkeypatch):
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=64, num_val=16, config=SynthConfig(image_size=32, num_classes=4), shard_size=32, seed=0)
    seen = []
    original = Teacher.capture

    def spy(self, images, layers, heads=None):
        seen.append(images.clone())
        return original(self, images, layers, heads)

    monkeypatch.setattr(Teacher, "capture", spy)
    out = tmp_path / "mix.zarr"
    run_precompute(PrecomputeConfig(data=(info["train"],), out=str(out), teacher=TEACHER, views=2, recipe="train_mix",
                                    encoding="lowrank:r=8:int8", batch_size=12, workers=0, threads=1, progress=False))
    teacher_saw = torch.cat(seen)
    store = CacheStore.open(out)
    recipe = Recipe.from_json(store.meta["recipe"]["ops"])
    assert recipe.has_pairs and store.meta["recipe"]["layout"][-1]["op"] == "mix"
    rebuilt, rows, partners_by_view = [], [], {}
    for unit in store.units():  # workers=0: the teacher saw the units in this order, each in tar order
        data = store.read_unit(unit.view, unit.shard_index)
        images = {}
        for entry in iter_shard(unit.url):
            assert str(data.keys[entry.position]) == entry.key and data.valid[entry.position]
            images[entry.position] = decode_sample(unit.url, entry)[0]
        replayed = replay_unit(recipe, images, {p: data.aug[p] for p in images})
        rebuilt += [replayed[p] for p in sorted(images)]
        unit_rows = _cols(recipe, data.aug[sorted(images)])
        rows.append(unit_rows)
        partners_by_view.setdefault(unit.view, []).append(unit_rows[:, 1])
        targets = mix_targets(recipe, data.aug[sorted(images)], sorted(images), data.labels[sorted(images)],
                              dict(enumerate(data.labels.tolist())), num_classes=4, smoothing=0.1)
        assert torch.allclose(targets.sum(1), torch.ones(len(images)), atol=1e-6)
    assert torch.equal(torch.stack(rebuilt), teacher_saw)
    rows = np.concatenate(rows)
    own = np.tile(np.arange(32), 4)
    assert (rows[:, 0] == 1).all() and (rows[:, 1] != own).all() and set(rows[:, 3]) == {0.0, 1.0}
    assert not np.array_equal(np.concatenate(partners_by_view[0]), np.concatenate(partners_by_view[1]))
    first = store.units()[0]
    aug = store.read_unit(first.view, first.shard_index).aug
    unmixed = torch.stack([recipe.apply(aug[e.position], decode_sample(first.url, e)[0])
                           for e in iter_shard(first.url)])
    differs = (unmixed != teacher_saw[:32]).flatten(1).any(1).numpy()
    assert differs.sum() > 16, "the teacher saw mixed images, not the plain ones"


def test_global_random_state_has_no_effect_on_mix_draws():
    recipe = parse_recipe("train_mix", DEFAULTS)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first = draw_mix(recipe, 0, 0, KEYS, POSITIONS)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert np.array_equal(first, draw_mix(recipe, 0, 0, KEYS, POSITIONS))

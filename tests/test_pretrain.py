"""`attncache teacher pretrain`: MAE and supervised teachers that load like any other teacher."""
import json
import tarfile
import io

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from attncache.cli.main import cli
from attncache.pipeline.studies.pretrain import (Mae, PretrainConfig, PretrainError, Supervised, pretrain,
    random_resized_crop)
from attncache.pipeline.studies.synth import SynthConfig, synth_dataset
from attncache.pipeline.teacher.model import Teacher, TeacherConfig

TINY = (("depth", 2), ("embed_dim", 32), ("img_size", 32), ("num_heads", 2), ("patch_size", 8))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    return synth_dataset(root, 128, 64, shard_size=64, seed=2, config=SynthConfig(num_classes=3), num_pool=128)


def _mae(pool, out, epochs=2, **kw):
    return pretrain(PretrainConfig(data=(pool["pool"],), out=str(out), method=Mae(), model_args=TINY, epochs=epochs,
                                   batch_size=32, progress=False, **kw))


def test_mae_writes_a_teacher_directory_that_precompute_and_finetune_load(pool, tmp_path):
    result = _mae(pool, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["model"] == "vit_tiny_patch16_224" and config["model_args"]["num_classes"] == 0
    report = json.loads((tmp_path / "t" / "pretrain.json").read_text())
    assert report["images"] == 128 and report["steps"] == result.steps == 8 and len(report["history"]) == 2
    teacher = Teacher(TeacherConfig(str(tmp_path / "t")))
    saved = load_file(str(tmp_path / "t" / "model.safetensors"))
    assert not any(k.startswith("decoder") for k in saved)  # the encoder only
    for name, tensor in teacher.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    from attncache.pipeline.train.student import StudentConfig, build_student
    student = build_student(StudentConfig("vit_tiny_patch16_224", TINY, 3, 0.0, 5),
                            init_from=TeacherConfig(str(tmp_path / "t")))
    assert torch.equal(student.blocks[1].attn.qkv.weight, saved["blocks.1.attn.qkv.weight"])


def test_same_arguments_give_the_same_weights_and_another_seed_does_not(pool, tmp_path):
    _mae(pool, tmp_path / "a", epochs=1)
    _mae(pool, tmp_path / "b", epochs=1)
    _mae(pool, tmp_path / "c", epochs=1, seed=1)
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_mae_reconstruction_loss_falls(pool, tmp_path):
    _mae(pool, tmp_path / "t", epochs=6)
    history = json.loads((tmp_path / "t" / "pretrain.json").read_text())["history"]
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]


def test_supervised_learns_above_chance_and_keeps_its_head(pool, tmp_path):
    result = pretrain(PretrainConfig(data=(pool["train"],), out=str(tmp_path / "s"), method=Supervised(),
                                     model_args=TINY, epochs=8, batch_size=32, eval_data=(pool["train"],),
                                     progress=False))
    assert result.eval_top1 is not None and result.eval_top1 > 100 / 3 + 10  # on its own training split
    assert load_file(str(tmp_path / "s" / "model.safetensors"))["head.weight"].shape[0] == 3


def test_bad_samples_are_skipped_with_their_reason_and_counted(pool, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key, data in (("broken", b"not a png"), ("empty", b"")):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = pretrain(PretrainConfig(data=(pool["pool"], str(bad)), out=str(tmp_path / "t"), method=Mae(),
                                     model_args=TINY, epochs=1, batch_size=32, progress=False))
    assert result.skipped == 2 and result.images == 128
    skipped = json.loads((tmp_path / "t" / "pretrain.json").read_text())["skipped"]
    assert {s["key"] for s in skipped} == {"broken", "empty"} and all(s["url"] == str(bad) for s in skipped)
    with pytest.raises(PretrainError, match="no usable images"):
        pretrain(PretrainConfig(data=(str(bad),), out=str(tmp_path / "u"), method=Mae(), model_args=TINY, epochs=1,
                                progress=False))


def test_supervised_on_unlabelled_pool_names_the_sample(pool, tmp_path):
    with pytest.raises(PretrainError, match="no usable images"):
        pretrain(PretrainConfig(data=(pool["pool"],), out=str(tmp_path / "s"), method=Supervised(), model_args=TINY,
                                epochs=1, progress=False))


def test_random_resized_crop_is_a_function_of_the_generator():
    images = torch.rand(4, 3, 16, 16)
    a = random_resized_crop(images, torch.Generator().manual_seed(0), (0.3, 1.0))
    b = random_resized_crop(images, torch.Generator().manual_seed(0), (0.3, 1.0))
    c = random_resized_crop(images, torch.Generator().manual_seed(1), (0.3, 1.0))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_cli_pretrain_prints_and_writes(pool, tmp_path):
    result = CliRunner().invoke(cli, ["teacher", "pretrain", "--method", "mae", "--data", pool["pool"], "--out",
                                      str(tmp_path / "t"), "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
                                      "--model-arg", "img_size=32", "--model-arg", "num_heads=2", "--model-arg",
                                      "patch_size=8", "--epochs", "1", "--batch-size", "32", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[-1])
    assert summary["images"] == 128 and summary["method"] == "mae"
    assert (tmp_path / "t" / "model.safetensors").is_file()


def _supervised(pool, out, optim):
    return pretrain(PretrainConfig(data=(pool["train"],), out=str(out), method=Supervised(), model_args=TINY, epochs=2,
                                   batch_size=32, optim=optim, eval_data=(pool["train"],), progress=False))


def test_pretrain_clips_the_gradient_norm_it_is_given(pool, tmp_path, monkeypatch):
    """The shared update step (pipeline/train/update.py): every optimiser step sees a gradient norm
    of at most --clip-grad, where the same run without it steps on larger ones."""
    from attncache.pipeline.train.optim import OptimConfig

    norms = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    base = PretrainConfig(data=(), out="").optim
    _supervised(pool, tmp_path / "free", base)
    free, norms[:] = list(norms), []
    _supervised(pool, tmp_path / "clip", OptimConfig(**{**base.__dict__, "clip_grad": 0.05}))
    assert len(norms) == len(free) == 8
    assert min(free) > 0.05 and max(norms) <= 0.05 * (1 + 1e-5)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("free", "clip"))
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])


def test_pretrain_keeps_an_ema_of_the_encoder_and_evaluates_it(pool, tmp_path, monkeypatch):
    """--model-ema-decay: model_ema.safetensors is the EMA (decay d) of the weights after each step,
    bit for bit; the live weights are those of the same run without an EMA."""
    from attncache.pipeline.train import update
    from attncache.pipeline.train.optim import OptimConfig

    seen = []
    step = update.Updater.step

    def spy(self, *args, **kwargs):
        if not seen:
            seen.append({k: v.clone() for k, v in self.ema_of.state_dict().items()})
        result = step(self, *args, **kwargs)
        seen.append({k: v.clone() for k, v in self.ema_of.state_dict().items()})
        return result

    base = PretrainConfig(data=(), out="").optim
    plain = _supervised(pool, tmp_path / "plain", base)
    monkeypatch.setattr(update.Updater, "step", spy)
    result = _supervised(pool, tmp_path / "ema", OptimConfig(**{**base.__dict__, "model_ema_decay": 0.8}))
    assert not (tmp_path / "plain" / "model_ema.safetensors").exists() and plain.eval_top1_ema is None
    live, ema = (load_file(str(tmp_path / "ema" / n)) for n in ("model.safetensors", "model_ema.safetensors"))
    assert all(torch.equal(live[k], v) for k, v in load_file(str(tmp_path / "plain" / "model.safetensors")).items())
    expected = {k: v.clone() for k, v in seen[0].items()}
    for weights in seen[1:]:
        for k, v in expected.items():
            v.lerp_(weights[k], 1.0 - 0.8)
    assert len(seen) == 9 and set(ema) == set(live) and "head.weight" in ema
    assert all(torch.equal(ema[k], expected[k]) for k in ema)
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], live["blocks.0.attn.qkv.weight"])
    report = json.loads((tmp_path / "ema" / "pretrain.json").read_text())
    assert result.eval_top1_ema is not None and report["eval_top1_ema"] == result.eval_top1_ema
    assert report["ema_weights"] == "model_ema.safetensors"


def test_held_out_top1_every_epoch_is_in_the_history_and_changes_no_weight(pool, tmp_path):
    """--eval-data is evaluated after every epoch (pretrain.json's history, the result); evaluating
    draws nothing from the run's generator, so the weights are those of the same run without it."""
    kw = dict(method=Supervised(), model_args=TINY, epochs=3, batch_size=32, progress=False)
    seen = pretrain(PretrainConfig(data=(pool["train"],), out=str(tmp_path / "e"), eval_data=(pool["val"],), **kw))
    blind = pretrain(PretrainConfig(data=(pool["train"],), out=str(tmp_path / "b"), **kw))
    history = json.loads((tmp_path / "e" / "pretrain.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(0 <= h["val_top1"] <= 100 for h in history)
    assert seen.eval_top1 == history[-1]["val_top1"] and blind.eval_top1 is None
    assert "val_top1" not in json.loads((tmp_path / "b" / "pretrain.json").read_text())["history"][0]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in "eb")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_every_and_the_last_epoch(pool, tmp_path):
    result = pretrain(PretrainConfig(data=(pool["train"],), out=str(tmp_path / "e"), method=Supervised(),
                                     model_args=TINY, epochs=5, batch_size=32, eval_data=(pool["val"],), eval_every=2,
                                     progress=False))
    assert [h["epoch"] for h in result.history if "val_top1" in h] == [1, 3, 4]


def test_holdout_splits_the_data_by_the_seed_and_evaluates_on_the_rest(pool, tmp_path):
    from attncache.pipeline.studies.pretrain_data import holdout, load_images

    data = load_images((pool["train"],), 32, True, progress=False)
    kept, held = holdout(data, 0.25, seed=0)
    again, other = holdout(data, 0.25, seed=0)[1], holdout(data, 0.25, seed=1)[1]
    assert len(held.images_NCHW) == 32 and len(kept.images_NCHW) == 96
    assert torch.equal(held.images_NCHW, again.images_NCHW) and not torch.equal(held.images_NCHW, other.images_NCHW)
    rows = {tuple(x.flatten()[:64].tolist()) for x in kept.images_NCHW}
    assert not any(tuple(x.flatten()[:64].tolist()) in rows for x in held.images_NCHW)  # disjoint
    result = pretrain(PretrainConfig(data=(pool["train"],), out=str(tmp_path / "h"), method=Supervised(),
                                     model_args=TINY, epochs=1, batch_size=32, holdout=0.25, progress=False))
    assert result.images == 96 and result.eval_top1 is not None and result.steps == 3


def test_mae_reports_a_held_out_reconstruction_loss_per_epoch(pool, tmp_path):
    result = _mae(pool, tmp_path / "m", epochs=2, eval_data=(pool["val"],))
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 2 and all(v > 0 for v in losses) and result.eval_top1 is None


def test_a_recipe_augments_and_is_deterministic_and_mix_is_refused(pool, tmp_path):
    spec = "rrc(scale=(0.35,1.0))|flip|randaug(n=1)|normalize|erase(p=0.5)"
    kw = dict(data=(pool["train"],), method=Supervised(), model_args=TINY, epochs=1, batch_size=32, progress=False)
    runs = [pretrain(PretrainConfig(out=str(tmp_path / n), recipe=r, **kw)) for n, r in (("a", spec), ("b", spec),
                                                                                          ("c", None))]
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["head.weight"], c["head.weight"])
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text())["recipe"] == spec and runs[0].steps == 4
    with pytest.raises(PretrainError, match="mix is not offered"):
        pretrain(PretrainConfig(out=str(tmp_path / "m"), recipe="rrc|flip|normalize|mix", **kw))


def test_cli_shows_held_out_top1_and_refuses_a_bad_recipe_in_one_line(pool, tmp_path):
    common = ["teacher", "pretrain", "--method", "supervised", "--data", pool["train"], "--model-arg", "depth=2",
              "--model-arg", "embed_dim=32", "--model-arg", "img_size=32", "--model-arg", "num_heads=2",
              "--model-arg", "patch_size=8", "--epochs", "2", "--batch-size", "32", "--quiet"]
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "t"), "--holdout", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[-1])
    assert [h["epoch"] for h in summary["history"]] == [0, 1] and summary["eval_top1"] == summary["history"][-1]["val_top1"]
    bad = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "u"), "--recipe", "rrc|nosuchop"])
    assert bad.exit_code == 2 and "nosuchop" in bad.output and not (tmp_path / "u").exists()


def test_the_progress_bar_shows_the_held_out_top1(pool, tmp_path, monkeypatch):
    from attncache.pipeline.studies import pretrain as module

    shown = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            pass

        def set_postfix(self, values):
            shown.append(dict(values))

        def close(self):
            pass

    monkeypatch.setattr(module, "tqdm", Bar)
    pretrain(PretrainConfig(data=(pool["train"],), out=str(tmp_path / "p"), method=Supervised(), model_args=TINY,
                            epochs=2, batch_size=32, eval_data=(pool["val"],), progress=False))
    assert [sorted(s) for s in shown] == [["loss", "val_top1"]] * 2 and all(float(s["val_top1"]) >= 0 for s in shown)

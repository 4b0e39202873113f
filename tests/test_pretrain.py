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

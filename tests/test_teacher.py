"""Teacher loading and Q/K capture: the captured factors are the attention the model computes."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from attncache.pipeline.teacher.model import Teacher, TeacherConfig, TeacherError, resolve_heads, resolve_layers

SMALL = (("depth", 3), ("embed_dim", 48), ("img_size", 32), ("num_heads", 3), ("patch_size", 8))

ARCHS = {
    "vit_cls": ("vit_tiny_patch16_224", SMALL),
    "vit_regs": ("vit_tiny_patch16_224", SMALL + (("reg_tokens", 4),)),
    "vit_no_cls": ("vit_tiny_patch16_224", SMALL + (("class_token", False), ("global_pool", "avg"))),
    "vit_qk_norm": ("vit_tiny_patch16_224", SMALL + (("qk_norm", True),)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", SMALL),
    "eva_no_rope": ("eva02_tiny_patch14_224", (("depth", 2), ("img_size", 28), ("use_rot_pos_emb", False))),
}


def _teacher(name, args, seed=0):
    return Teacher(TeacherConfig(name, tuple(sorted(args)), random_init=True, seed=seed))


def _images(teacher, n=2):
    size = teacher.recipe_defaults().image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_captured_qk_reproduce_the_models_attention_maps(arch):
    """softmax(scale Q K^T) from the hooks equals timm's own (unfused) attention probabilities."""
    teacher = _teacher(*ARCHS[arch])
    x = _images(teacher)
    layers = tuple(range(teacher.num_layers))
    q, k = teacher.capture(x, layers)
    probs = {}
    handles = []
    for l in layers:
        attn = teacher.model.blocks[l].attn
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o, l=l: probs.__setitem__(l, i[0].clone())))
    with torch.inference_mode():
        teacher.model.forward_features(x)
    for h in handles:
        h.remove()
    mine = ((q * teacher.scale) @ k.transpose(-1, -2)).softmax(-1)
    assert q.shape == (2, len(layers), teacher.num_heads, teacher.num_tokens, teacher.head_dim)
    for i, l in enumerate(layers):
        torch.testing.assert_close(mine[:, i], probs[l], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit_cls", "vit_regs", "vit_no_cls", "vit_qk_norm", "deit_distilled"])
def test_captured_qk_reproduce_the_attention_output_through_the_projection(arch):
    """attention @ V through the projection equals the attention module's output (fused path)."""
    teacher = _teacher(*ARCHS[arch])
    x = _images(teacher)
    layer = teacher.num_layers - 1
    attn = teacher.model.blocks[layer].attn
    seen = {}
    h1 = attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o.clone()))
    h2 = attn.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
    q, k = teacher.capture(x, (layer,))
    h1.remove(), h2.remove()
    B, N = x.shape[0], teacher.num_tokens
    v = seen["qkv"].reshape(B, N, 3, teacher.num_heads, teacher.head_dim).permute(2, 0, 3, 1, 4)[2]
    probs = ((q[:, 0] * teacher.scale) @ k[:, 0].transpose(-1, -2)).softmax(-1)
    out = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(B, N, -1)))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)


def test_prefix_tokens_and_grid_are_read_from_the_model():
    assert _teacher(*ARCHS["vit_regs"]).num_prefix_tokens == 5
    assert _teacher(*ARCHS["vit_no_cls"]).num_prefix_tokens == 0
    assert _teacher(*ARCHS["deit_distilled"]).num_prefix_tokens == 2
    assert _teacher(*ARCHS["vit_cls"]).num_tokens == 1 + 16


def test_rope_teachers_are_refused_with_the_reason():
    with pytest.raises(TeacherError, match="rotary"):
        _teacher("eva02_tiny_patch14_224", (("depth", 2), ("img_size", 28)))


def test_random_init_is_a_function_of_the_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = _teacher(*ARCHS["vit_cls"], seed=7), _teacher(*ARCHS["vit_cls"], seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.weights_sha256 == b.weights_sha256
    assert _teacher(*ARCHS["vit_cls"], seed=8).weights_sha256 != a.weights_sha256


def test_local_checkpoints_load_and_reproduce_the_weights(tmp_path):
    source = _teacher(*ARCHS["vit_cls"], seed=3)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": state}, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        t = Teacher(TeacherConfig("vit_tiny_patch16_224", SMALL, checkpoint=str(tmp_path / file), seed=99))
        assert t.weights_sha256 == source.weights_sha256
        assert t.identity()["checkpoint"]["file"] == file


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(TeacherError, match="weights_only"):
        Teacher(TeacherConfig("vit_tiny_patch16_224", SMALL, checkpoint=str(tmp_path / "evil.pth")))
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_for_another_architecture_names_the_mismatch(tmp_path):
    other = _teacher("vit_tiny_patch16_224", SMALL + (("qk_norm", True),))
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, tmp_path / "o.safetensors")
    with pytest.raises(TeacherError, match="unexpected"):
        Teacher(TeacherConfig("vit_tiny_patch16_224", SMALL, checkpoint=str(tmp_path / "o.safetensors")))


def test_offline_hub_name_without_weights_says_what_to_do():
    with pytest.raises(TeacherError, match="--checkpoint"):
        Teacher(TeacherConfig("vit_tiny_patch16_224", SMALL))


def test_layer_and_head_selection_syntax():
    assert resolve_layers("0:-3", 12) == tuple(range(9))
    assert resolve_layers("::4", 12) == (0, 4, 8)
    assert resolve_layers("1,5", 12) == (1, 5)
    assert resolve_layers("-1", 12) == (11,)
    assert resolve_heads(None, 3) == (0, 1, 2)
    assert resolve_heads("2,0", 3) == (2, 0)
    with pytest.raises(ValueError):
        resolve_layers("5:2", 12)
    with pytest.raises(ValueError):
        resolve_heads("3", 3)

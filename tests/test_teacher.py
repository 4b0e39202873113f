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
    with torch.inference_mode():  # the capture stops before the output: a full forward makes it
        teacher.model.forward_features(x)
    h1.remove(), h2.remove()
    q, k = teacher.capture(x, (layer,))
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
    with pytest.raises(TeacherError, match="--teacher-checkpoint"):
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


def _full_forward_capture(teacher, x, layers):
    """Q/K of `layers` from an uninterrupted forward_features (hooks that only copy), the reference."""
    got = {}
    handles = [getattr(teacher.model.blocks[l].attn, name).register_forward_hook(
        lambda m, i, o, key=(l, name): got.__setitem__(key, o.clone()))
        for l in layers for name in ("q_norm", "k_norm")]
    with torch.inference_mode():
        teacher.model.forward_features(x)
    for h in handles:
        h.remove()
    return (torch.stack([got[(l, "q_norm")] for l in layers], 1), torch.stack([got[(l, "k_norm")] for l in layers], 1))


@pytest.mark.parametrize("arch, layers", [("vit_cls", (0, 1)), ("vit_regs", (1,)), ("deit_distilled", (0,)),
                                          ("vit_qk_norm", (2, 0)), ("eva_no_rope", (0,))])
def test_capture_stops_after_the_last_cached_layer_with_bit_identical_factors(arch, layers):
    """Blocks after the last selected layer, the last block's attention projection and MLP, the final
    norm and the head never run, and Q/K of the selected layers are bit-identical to those of a full
    forward."""
    teacher = _teacher(*ARCHS[arch])
    x = _images(teacher)
    ran = {}
    last = max(layers)
    watched = [(f"block{i}", b) for i, b in enumerate(teacher.model.blocks)] + [
        ("mlp_last", teacher.model.blocks[last].mlp), ("norm", teacher.model.norm),
        ("proj_last", teacher.model.blocks[last].attn.proj), ("k_norm_last", teacher.model.blocks[last].attn.k_norm)]
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: ran.__setitem__(n, ran.get(n, 0) + 1)) for n, m in watched]
    q, k = teacher.capture(x, layers)
    for h in handles:
        h.remove()
    assert {n: c for n, c in ran.items()} == {**{f"block{i}": 1 for i in range(last)}, "k_norm_last": 1}
    ref_q, ref_k = _full_forward_capture(teacher, x, layers)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    q_all, k_all = teacher.capture(x, tuple(range(teacher.num_layers)))
    slots = [list(range(teacher.num_layers)).index(l) for l in layers]
    assert torch.equal(q, q_all[:, slots]) and torch.equal(k, k_all[:, slots])


def test_default_layers_are_all_but_the_last_three():
    from attncache.pipeline.teacher.model import DEFAULT_LAYERS_TEXT, default_layers
    from attncache.pipeline.train.student import default_layers as student_default

    assert student_default is default_layers  # one definition: precompute and train cannot drift
    assert resolve_layers(default_layers(12), 12) == resolve_layers(DEFAULT_LAYERS_TEXT, 12) == tuple(range(9))
    assert resolve_layers(default_layers(24), 24) == tuple(range(21))
    assert resolve_layers(default_layers(3), 3) == (0, 1, 2) and resolve_layers(default_layers(4), 4) == (0,)

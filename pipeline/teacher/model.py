"""The Teacher: a frozen timm ViT whose Q/K of selected layers are captured during its forward.

Q and K are captured with forward hooks on each selected block's `attn.q_norm` and `attn.k_norm`:
their outputs are Q and K exactly as timm's attention uses them (after q/k norm, before the
1/sqrt(d) scale), shape [B, H, N, d], and the hooks work with fused attention too. Models that
rotate Q/K after those modules (RoPE: EVA-02 and friends) are refused, since the captured tensors
would not be what the attention used. The forward stops once the last selected layer's attention
has run: nothing after it changes what is captured, and the blocks skipped are time saved.

Loading lives in pipeline/teacher/loading.py and layer / head selection in
pipeline/teacher/selection.py; their public names are importable from here as before.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from attncache.pipeline.augment.recipe import RecipeDefaults
from attncache.pipeline.teacher.loading import (TEACHER_CONFIG_FILE, TEACHER_WEIGHTS_FILE, TeacherConfig,  # noqa: F401
    TeacherError, _create, _seeded_init, _sha256_file, build_model, load_state_dict, parse_model_args, resolve_teacher_config,
    weights_fingerprint)
from attncache.pipeline.teacher.selection import (DEFAULT_LAYERS_TEXT, check_heads_text, check_layers_text,  # noqa: F401
    default_layers, resolve_heads, resolve_layers, resolve_layers_or_default)
from attncache.pipeline.teacher.pretrained import warn_tag_normalisation
from attncache.pipeline.teacher.self_check import check_layers, first_failure, probe_images

__all__ = ["DEFAULT_LAYERS_TEXT", "TEACHER_CONFIG_FILE", "TEACHER_WEIGHTS_FILE", "Teacher", "TeacherConfig",
           "TeacherError", "build_model", "check_heads_text", "check_layers_text", "check_supported", "default_layers",
           "load_state_dict", "model_recipe_defaults", "named_recipe_defaults", "parse_model_args", "resolve_heads", "resolve_layers",
           "resolve_layers_or_default", "resolve_teacher_config", "weights_fingerprint"]


class _StopForward(Exception):
    """Raised by the hook on the last selected layer: the rest of the forward is not needed."""


def _stop_forward(_module, _inputs, _output) -> None:
    raise _StopForward


def _stop_after_both(modules: tuple[torch.nn.Module, torch.nn.Module]) -> list:
    """Hooks on the last layer's q_norm and k_norm that stop the forward once both have run (in
    whichever order the attention calls them), after their capture hooks: that layer's attention
    product and projection never run."""
    seen: set[int] = set()

    def hook(module, _inputs, _output) -> None:
        seen.add(id(module))
        if len(seen) == 2:
            raise _StopForward
    return [m.register_forward_hook(hook) for m in modules]


def check_supported(model: torch.nn.Module, name: str) -> None:
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TeacherError(f"{name}: not a ViT-family model (no .blocks)")
    if getattr(model, "rope", None) is not None or getattr(model, "rope_mixed", False):
        raise TeacherError(f"{name}: uses rotary position embeddings, applied to Q/K after q_norm/k_norm; "
                           "captured factors would not be the attention it computes (RoPE teachers unsupported)")
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_norm", "k_norm", "scale", "num_heads")):
            raise TeacherError(f"{name}: block {i} has no timm-style attention with q_norm/k_norm/scale")


def model_recipe_defaults(model: torch.nn.Module, name: str) -> RecipeDefaults:
    """Mean, std, crop and interpolation from the pretrained config; the size from the model
    itself, since `img_size=32` style arguments change it but not the pretrained config."""
    data_cfg = timm.data.resolve_model_data_config(model)
    height, width = (int(v) for v in model.patch_embed.img_size)
    if height != width:
        raise TeacherError(f"{name}: non-square input {height}x{width} is not supported")
    return RecipeDefaults(image_size=height, mean=tuple(data_cfg["mean"]),
                          std=tuple(data_cfg["std"]), crop_pct=float(data_cfg.get("crop_pct", 0.875)),
                          interpolation=str(data_cfg.get("interpolation", "bicubic")))


def named_recipe_defaults(name: str, model_args: dict) -> RecipeDefaults:
    """`model_recipe_defaults` of the timm model `name` built with `model_args`, without its weights:
    a store records its teacher so (name with tag, arguments), and a student trained from the store
    takes the eval crop and interpolation the teacher's pretrained config gives, as a run with the
    teacher online does. Built on the meta device: no memory, no time, no random draws."""
    with torch.device("meta"):
        model = _create(TeacherConfig(name, tuple(sorted(model_args.items()))), pretrained=False)
    return model_recipe_defaults(model, name)


class Teacher:
    """A frozen timm ViT in eval mode with hooks that capture Q/K of selected layers."""

    def __init__(self, cfg: TeacherConfig):
        cfg = resolve_teacher_config(cfg)
        self.config = cfg
        self.model = build_model(cfg).eval().requires_grad_(False).to(cfg.device)
        check_supported(self.model, cfg.name)
        attn0 = self.model.blocks[0].attn
        self.num_layers = len(self.model.blocks)
        self.num_heads = int(attn0.num_heads)
        self.head_dim = int(getattr(attn0, "head_dim", self.model.embed_dim // self.num_heads))
        self.scale = float(attn0.scale)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        self.num_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.weights_sha256 = weights_fingerprint(self.model)
        self.self_check()

    def self_check(self) -> None:
        """Refuse a teacher whose attention is not softmax(scale * Q K^T) of what `capture` takes
        (pipeline/teacher/self_check.py): one deterministic image, every layer."""
        images = probe_images(int(self.model.patch_embed.img_size[0]))
        layers = tuple(range(self.num_layers))
        results = check_layers([b.attn for b in self.model.blocks], lambda x: self._capture(x, layers, None),
                               images, self.scale)
        failure = first_failure(results)
        if failure is not None:
            raise TeacherError(f"{self.config.name}: {failure}; such teachers are not supported")

    def recipe_defaults(self) -> RecipeDefaults:
        """The pretrained config's preprocessing (its tag's: see pipeline/teacher/pretrained.py, which
        warns once when the checkpoint's name says it was trained with another tag's normalisation)."""
        warn_tag_normalisation(self.config.name, self.config.checkpoint)
        return model_recipe_defaults(self.model, self.config.name)

    def identity(self) -> dict:
        cfg = self.config
        return {
            "name": cfg.name,
            "model_args": {k: v for k, v in cfg.model_args},
            "checkpoint": None if cfg.checkpoint is None else {
                "file": Path(cfg.checkpoint).name, "sha256": _sha256_file(cfg.checkpoint)},
            "random_init_seed": cfg.seed if cfg.random_init and not cfg.checkpoint else None,
            "weights_sha256": self.weights_sha256,
            "num_layers": self.num_layers, "num_heads": self.num_heads, "head_dim": self.head_dim,
            "scale": self.scale, "num_prefix_tokens": self.num_prefix_tokens, "grid": list(self.grid),
            "num_tokens": self.num_tokens, "timm_version": timm.__version__,
        }

    def capture(self, images_BCHW: torch.Tensor, layers: tuple[int, ...],
                heads: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Q and K of the chosen layers and heads, float32 [B, L, H, N, d] (see `_capture`). The
        self-check runs the same hooks with the last layer's attention let through, so that its output
        can be replayed; Q and K are made before that point, so it checks these values."""
        return self._capture(images_BCHW, layers, heads, through_attention=False)

    @torch.inference_mode()
    def _capture(self, images_BCHW: torch.Tensor, layers: tuple[int, ...],
                 heads: tuple[int, ...] | None, through_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Q and K of the chosen layers and heads: two float32 tensors [B, L, H, N, d] on the
        teacher's device (encoding runs there too). Hooks copy each layer's Q/K straight into one
        preallocated buffer, so no per-layer tensors are kept alive through the forward.

        The forward stops once the last selected block's Q and K are made: its attention product,
        projection and MLP, the blocks after it, the final norm and the head never run (about 2 % of
        a ViT-S forward more than stopping after that attention). `through_attention` (the self-check)
        lets that attention run so its output can be replayed. Every capture runs the same blocks in
        the same order up to there, so the captured values are bit-identical to a full forward's."""
        images_BCHW = images_BCHW.to(self.config.device)
        head_idx = list(heads) if heads is not None else list(range(self.num_heads))
        shape = (images_BCHW.shape[0], len(layers), len(head_idx), self.num_tokens, self.head_dim)
        q = torch.empty(shape, dtype=torch.float32, device=images_BCHW.device)
        k = torch.empty_like(q)
        all_heads = len(head_idx) == self.num_heads and head_idx == sorted(head_idx)
        handles = []
        for slot, layer in enumerate(layers):
            attn = self.model.blocks[layer].attn
            for module, buffer in ((attn.q_norm, q), (attn.k_norm, k)):
                def hook(_m, _inp, out, dst=buffer[:, slot]):
                    dst.copy_(out if all_heads else out[:, head_idx])
                handles.append(module.register_forward_hook(hook))
        last = self.model.blocks[max(layers)].attn
        if through_attention:
            handles.append(last.register_forward_hook(_stop_forward))
        else:  # after the capture hooks, registered above: hooks run in registration order
            handles += _stop_after_both((last.q_norm, last.k_norm))
        try:
            self.model.forward_features(images_BCHW)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return q, k

"""Teacher loading (timm name, local checkpoint, teacher-pretrain directory) and Q/K capture.

Q and K are captured with forward hooks on each selected block's `attn.q_norm` and `attn.k_norm`:
their outputs are Q and K exactly as timm's attention uses them (after q/k norm, before the
1/sqrt(d) scale), shape [B, H, N, d], and the hooks work with fused attention too. Models that
rotate Q/K after those modules (RoPE: EVA-02 and friends) are refused, since the captured tensors
would not be what the attention used.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from attncache.pipeline.augment.recipe import RecipeDefaults
from attncache.pipeline.teacher.self_check import check_layers, first_failure, probe_images

TEACHER_CONFIG_FILE = "config.json"
TEACHER_WEIGHTS_FILE = "model.safetensors"


class TeacherError(ValueError):
    """The teacher cannot be loaded or is not a supported ViT."""


@dataclass(frozen=True)
class TeacherConfig:
    name: str
    model_args: tuple[tuple[str, Any], ...] = ()
    checkpoint: str | None = None
    random_init: bool = False
    seed: int = 0
    device: str = "cpu"


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> tuple[tuple[str, Any], ...]:
    """`k=v` strings to sorted pairs; values go through JSON then fall back to plain strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TeacherError(f"model argument {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        out[key.strip()] = value
    return tuple(sorted(out.items()))


def resolve_teacher_config(cfg: TeacherConfig) -> TeacherConfig:
    """A directory written by `teacher pretrain` names its timm model, arguments and weights."""
    path = Path(cfg.name)
    if not path.is_dir():
        return cfg
    config_file = path / TEACHER_CONFIG_FILE
    if not config_file.is_file():
        raise TeacherError(f"{path} is a directory but has no {TEACHER_CONFIG_FILE} naming the timm model")
    saved = _read_teacher_config(config_file)
    args = dict(saved.get("model_args", {}))
    args.update(dict(cfg.model_args))
    checkpoint = cfg.checkpoint or str(path / saved.get("weights", TEACHER_WEIGHTS_FILE))
    return TeacherConfig(saved["model"], tuple(sorted(args.items())), checkpoint, cfg.random_init, cfg.seed, cfg.device)


def _read_teacher_config(config_file: Path) -> dict:
    """config.json of a teacher directory, checked field by field: a hand-edited or damaged file is
    named with what is wrong instead of failing later inside timm."""
    where = f"teacher config {config_file}"
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherError(f"{where} is not readable JSON ({_first_line(exc)}); restore it or write it again "
                           'as {"model": "<timm name>", "model_args": {...}}') from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), str) or not saved["model"].strip():
        raise TeacherError(f'{where} does not name a timm model (expected an object with "model": "<timm name>")')
    if not isinstance(saved.get("model_args", {}), dict):
        raise TeacherError(f'{where}: "model_args" must be an object of timm keyword arguments')
    weights = saved.get("weights", TEACHER_WEIGHTS_FILE)
    if not isinstance(weights, str) or not weights or Path(weights).name != weights or weights in (".", ".."):
        raise TeacherError(f'{where}: "weights" must be a file name inside the teacher directory, got {weights!r}')
    return saved


def _unpickling_cause(exc: BaseException) -> str:
    """The one useful sentence of torch's multi-paragraph weights_only error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    cause = text.split("WeightsUnpickler error:", 1)[-1]
    cause = re.split(r"Please use|Check the documentation", cause)[0]
    return " ".join(cause.split())[:200] or _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Safetensors, or a torch file read with weights_only=True: a checkpoint never runs code.
    Every way a file can be damaged or hostile (truncated, a header that lies about its length or
    offsets, pickled objects) ends in one TeacherError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is the problem
            raise TeacherError(f"checkpoint {path} is not a readable safetensors file ({_first_line(exc)}); "
                               "it may be truncated or damaged: copy or export it again") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # pickled objects beyond tensors and containers, or damage
        raise TeacherError(f"refusing to load {path}: it needs pickle beyond weights_only=True "
                           f"({_unpickling_cause(exc)}) or is damaged; save just the state dict "
                           "(torch.save(model.state_dict(), ...)) or use safetensors") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
        raise TeacherError(f"refusing to load {path}: not loadable with weights_only=True ({_first_line(exc)}); "
                           "it may be truncated or not a torch checkpoint") from None
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise TeacherError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


@contextmanager
def _seeded_init(seed: int):
    """timm initialises weights from torch's global generator: seed it inside a fork so the
    caller's global state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_name(cfg: TeacherConfig) -> None:
    if not timm.is_model(cfg.name):
        raise TeacherError(f"unknown timm model {cfg.name!r}: not a teacher directory and not a name timm knows "
                           "(see timm.list_models())")


def _create(cfg: TeacherConfig, pretrained: bool) -> torch.nn.Module:
    """timm.create_model with the name and arguments checked into one-line errors (before any
    download is tried)."""
    _check_name(cfg)
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, **dict(cfg.model_args))
    except (TypeError, ValueError, AssertionError) as exc:  # an unknown keyword, a width not divisible by heads, ...
        raise TeacherError(f"timm model {cfg.name!r} does not accept the model arguments "
                           f"{dict(cfg.model_args)} ({_first_line(exc)}); check --model-arg (and the model's "
                           "config.json) against the model's constructor") from None


def _fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], cfg: TeacherConfig) -> None:
    """Load weights only when every key and shape fits: a partial or reshaped load would be a
    teacher nobody trained."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise TeacherError(f"checkpoint {cfg.checkpoint} does not fit {cfg.name} {dict(cfg.model_args)}: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}, shapes differ {shapes[:4]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TeacherError(f"checkpoint {cfg.checkpoint} does not fit {cfg.name}: {_first_line(exc)}") from None


def build_model(cfg: TeacherConfig) -> torch.nn.Module:
    if cfg.random_init or cfg.checkpoint:
        with _seeded_init(cfg.seed):
            model = _create(cfg, pretrained=False)
        if cfg.checkpoint:
            _fit_state_dict(model, load_state_dict(cfg.checkpoint), cfg)
        return model
    try:
        return _create(cfg, pretrained=True)
    except TeacherError:
        raise
    except Exception as exc:
        raise TeacherError(f"could not load pretrained weights for {cfg.name!r} ({_first_line(exc)}); pass --checkpoint FILE "
                           "or a teacher directory, or --random-init for tests") from exc


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


def _slice_parts(spec: str) -> list[int | None]:
    parts = spec.split(":")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        numbers = None
    if numbers is None or len(parts) > 3:
        raise TeacherError(f"layer selection {spec!r}: not a slice START:STOP[:STEP] of integers "
                           "(e.g. '0:-3', '::2') or a comma list (e.g. '0,3,7')")
    if len(numbers) == 3 and numbers[2] == 0:
        raise TeacherError(f"layer selection {spec!r}: a slice step cannot be 0 (e.g. '::2' takes every other layer)")
    return numbers


def check_layers_text(spec: str | None) -> None:
    """What can be refused before the model is built: bad syntax, a zero step, a slice that is
    empty in every model (non-negative START >= STOP with a positive step), a repeated layer."""
    spec = (spec or ":").strip()
    if "," in spec or ":" not in spec:
        try:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            chosen = None
        if not chosen:
            raise TeacherError(f"layer selection {spec!r}: not a comma list of layer indices (e.g. '0,3,7') "
                               "or a slice (e.g. '0:-3')")
        if len(set(chosen)) != len(chosen):
            raise TeacherError(f"layer selection {spec!r} names a layer twice")
        return
    start, stop, *step = _slice_parts(spec) + [None] * 2
    step = step[0] if step and step[0] is not None else 1
    if step > 0 and start is not None and stop is not None and 0 <= stop <= start:
        raise TeacherError(f"layer selection {spec!r} selects no layer (START {start} >= STOP {stop}); "
                           "e.g. '0:-3' or '2:5'")


def resolve_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """Python slice syntax over layer indices (`0:-3`, `::2`, `5`) or a comma list (`0,3,7`)."""
    spec = (spec or ":").strip()
    indices = list(range(num_layers))
    if "," in spec or (":" not in spec):
        try:
            chosen = [indices[int(x)] for x in spec.split(",") if x.strip()]
        except (IndexError, ValueError):
            raise TeacherError(f"layer selection {spec!r}: not a slice or list of layers that exist in a model "
                               f"with {num_layers} layers") from None
    else:
        chosen = indices[slice(*_slice_parts(spec))]
    if not chosen or len(set(chosen)) != len(chosen):
        raise TeacherError(f"layer selection {spec!r} selects {chosen} out of {num_layers} layers")
    return tuple(chosen)


def _head_list(spec: str) -> tuple[int, ...]:
    try:
        heads = tuple(int(h) for h in spec.split(",") if h.strip())
    except ValueError:
        heads = ()
    if not heads or min(heads) < 0:
        raise TeacherError(f"head selection {spec!r}: not a comma list of head indices >= 0 (e.g. '0,2') or 'all'")
    if len(set(heads)) != len(heads):
        raise TeacherError(f"head selection {spec!r} names a head twice")
    return heads


def check_heads_text(spec: str | None) -> None:
    """Syntax of a head selection, refused before the model is built (the count needs the model)."""
    if spec is not None and spec.strip() not in ("", "all", ":"):
        _head_list(spec)


def resolve_heads(spec: str | None, num_heads: int) -> tuple[int, ...]:
    if spec is None or spec.strip() in ("", "all", ":"):
        return tuple(range(num_heads))
    heads = _head_list(spec)
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise TeacherError(f"head selection {spec!r}: heads {bad} do not exist in a teacher with {num_heads} heads "
                           f"(0..{num_heads - 1})")
    return heads


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
        """Q and K of the chosen layers and heads, float32 [B, L, H, N, d] (see `_capture`, which
        the self-check runs too, so it checks exactly this capture)."""
        return self._capture(images_BCHW, layers, heads)

    @torch.inference_mode()
    def _capture(self, images_BCHW: torch.Tensor, layers: tuple[int, ...],
                 heads: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Q and K of the chosen layers and heads: two float32 tensors [B, L, H, N, d] on the
        teacher's device (encoding runs there too). Hooks copy each layer's Q/K straight into one
        preallocated buffer, so no per-layer tensors are kept alive through the forward."""
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
        try:
            self.model.forward_features(images_BCHW)
        finally:
            for h in handles:
                h.remove()
        return q, k

"""Loading a teacher: a timm name, a local checkpoint or a `teacher pretrain` directory, checked into
one-line errors before anything runs (pipeline/teacher/model.py builds the Teacher from it)."""
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


def state_dict_misfit(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """What keeps `state` from loading whole into `model`: missing keys, unexpected keys, and
    'key (shape) != (shape)' for each key whose shape differs. All empty: it fits."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def _fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], cfg: TeacherConfig) -> None:
    """Load weights only when every key and shape fits: a partial or reshaped load would be a
    teacher nobody trained."""
    missing, unexpected, shapes = state_dict_misfit(model, state)
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
        raise TeacherError(f"could not load pretrained weights for {cfg.name!r} ({_first_line(exc)}); pass --teacher-checkpoint FILE "
                           "or a teacher directory, or --random-init for tests") from exc

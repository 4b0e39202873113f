"""Teacher signals for the transferred layers, from the cache or from a live teacher, and the checks
that a student fits them before the first step.

Both sources return, per transferred layer, the tensor the strategy asks for: logits
[B, H, N, N], or Q / K [B, H, N, d]. The cache source decodes the batch's encoded factors on the
training device in one batched call per step; the online source runs the teacher on the same
replayed images. A strategy cannot tell them apart, which is what the parity tests rely on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.factors import Encoding, _as_tensor, _from_storage, encoding_from_json, exact_logits
from pipeline.student import Geometry, Signal, Strategy, StudentMismatch
from pipeline.teacher import Teacher


@dataclass(frozen=True)
class SignalGeometry:
    """The teacher side of a fit check: from a store's metadata or from a live teacher."""

    source: str
    layers: tuple[int, ...]  # teacher block indices available
    num_heads: int
    head_dim: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    image_size: int
    serves_qk: bool

    @classmethod
    def of_store(cls, meta: dict) -> "SignalGeometry":
        tokens, teacher = meta["tokens"], meta["teacher"]
        return cls(f"cache ({meta['encoding']['spec']}, teacher {teacher['name']})", tuple(meta["layers"]),
                   len(meta["heads"]), int(teacher["head_dim"]), int(tokens["count"]),
                   int(tokens["num_prefix_tokens"]), tuple(tokens["grid"]), int(meta["recipe"]["output_size"]),
                   encoding_from_json(meta["encoding"]).serves_qk)

    @classmethod
    def of_teacher(cls, teacher: Teacher) -> "SignalGeometry":
        return cls(f"online teacher {teacher.config.name}", tuple(range(teacher.num_layers)), teacher.num_heads,
                   teacher.head_dim, teacher.num_tokens, teacher.num_prefix_tokens, teacher.grid,
                   teacher.recipe_defaults().image_size, True)


def check_fit(student: Geometry, teacher: SignalGeometry, strategy: Strategy, layers: tuple[int, ...]) -> None:
    """Refuse, before any step, a student that the teacher signal cannot serve; name both values."""
    problems = []
    for what, s, t in (("tokens", student.num_tokens, teacher.num_tokens),
                       ("prefix tokens", student.num_prefix_tokens, teacher.num_prefix_tokens),
                       ("patch grid", tuple(student.grid), tuple(teacher.grid)),
                       ("image size", student.image_size, teacher.image_size),
                       ("heads", student.num_heads, teacher.num_heads)):
        if s != t:
            problems.append(f"{what}: student {s}, {teacher.source} {t}")
    if strategy.signal in (Signal.Q, Signal.K):
        if not teacher.serves_qk:
            problems.append(f"mode {strategy.name} needs teacher Q/K, but the {teacher.source} stores "
                            "only logit factors: precompute with --encoding exact:fp16 (or exact:fp32)")
        elif student.head_dim != teacher.head_dim:
            problems.append(f"head dim: student {student.head_dim}, {teacher.source} {teacher.head_dim}")
    beyond = [l for l in layers if l >= student.num_layers]
    if beyond:
        problems.append(f"layers {beyond}: the student has only {student.num_layers} layers")
    missing = [l for l in layers if l not in teacher.layers]
    if missing and strategy.signal is not Signal.NONE:
        problems.append(f"layers {missing} are not in the {teacher.source} (it has {list(teacher.layers)})")
    if problems:
        raise StudentMismatch("student does not fit the teacher signal: " + "; ".join(problems))


class CacheSignal:
    """Decodes the batch's cached factors of the transferred layers on the training device."""

    def __init__(self, meta: dict, layers: tuple[int, ...], signal: Signal, heads: tuple[int, ...] | None = None):
        self.heads = None if heads is None else torch.tensor([meta["heads"].index(h) for h in heads])
        self.encoding: Encoding = encoding_from_json(meta["encoding"])
        self.scale = float(meta["teacher"]["scale"])
        self.slots = [meta["layers"].index(l) for l in layers]
        self.signal = signal

    def __call__(self, batch: dict, device) -> list[torch.Tensor]:
        slots = torch.tensor(self.slots)
        arrays = {n: a.index_select(1, slots).to(device, non_blocking=True) for n, a in batch["factors"].items()}
        if self.signal is Signal.LOGITS:
            out = self.encoding.decode_logits(arrays, self.scale, device)
        else:
            out = _from_storage(_as_tensor(arrays["q" if self.signal is Signal.Q else "k"], device), self.encoding.dtype)
        if self.heads is not None:
            out = out.index_select(2, self.heads.to(out.device))
        return list(out.unbind(1))


class OnlineSignal:
    """Runs the teacher on the batch's images (the replayed pixels) for the transferred layers."""

    def __init__(self, teacher: Teacher, layers: tuple[int, ...], signal: Signal, heads: tuple[int, ...] | None = None):
        self.teacher, self.layers, self.signal, self.heads = teacher, layers, signal, heads

    def __call__(self, batch: dict, device) -> list[torch.Tensor]:
        q, k = self.teacher.capture(batch["image"], self.layers, self.heads)
        if self.signal is Signal.LOGITS:
            out = exact_logits(q, k, self.teacher.scale)
        else:
            out = q if self.signal is Signal.Q else k
        return [t.clone().to(device) for t in out.unbind(1)]  # clone: leave inference mode


class NoSignal:
    def __call__(self, batch: dict, device) -> None:
        return None

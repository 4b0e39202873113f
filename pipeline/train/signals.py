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

from attncache.pipeline.encodings.exact import QK_ENCODINGS
from attncache.pipeline.encodings.kl import exact_logits
from attncache.pipeline.encodings.protocol import SIGNALS, check_signal
from attncache.pipeline.encodings.spec import Encoding, encoding_from_json
from attncache.pipeline.teacher.model import Teacher
from attncache.pipeline.train.student import Geometry, Signal, Strategy, StudentMismatch


@dataclass(frozen=True)
class SignalGeometry:
    """The teacher side of a fit check: from a store's metadata or from a live teacher."""

    source: str
    layers: tuple[int, ...]  # teacher block indices available
    num_heads: int  # the teacher's heads; student head h takes teacher head h
    head_dim: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    image_size: int
    decodes: frozenset[str] = frozenset(SIGNALS)  # what the source can give: "logits", "q", "k"
    refusal: str = ""  # why the rest cannot be given (the encoding's own words)
    heads: tuple[int, ...] | None = None  # teacher heads held (a store may hold a subset); None: all

    @property
    def serves_qk(self) -> bool:
        return {"q", "k"} <= self.decodes

    @classmethod
    def of_store(cls, meta: dict) -> "SignalGeometry":
        tokens, teacher = meta["tokens"], meta["teacher"]
        encoding = encoding_from_json(meta["encoding"])
        return cls(f"cache ({meta['encoding']['spec']}, teacher {teacher['name']})", tuple(meta["layers"]),
                   int(teacher["num_heads"]), int(teacher["head_dim"]), int(tokens["count"]),
                   int(tokens["num_prefix_tokens"]), tuple(tokens["grid"]), int(meta["recipe"]["output_size"]),
                   encoding.decodes, encoding.refusal, tuple(meta["heads"]))

    @classmethod
    def of_teacher(cls, teacher: Teacher) -> "SignalGeometry":
        return cls(f"online teacher {teacher.config.name}", tuple(range(teacher.num_layers)), teacher.num_heads,
                   teacher.head_dim, teacher.num_tokens, teacher.num_prefix_tokens, teacher.grid,
                   teacher.recipe_defaults().image_size)


def check_fit(student: Geometry, teacher: SignalGeometry, strategy: Strategy, layers: tuple[int, ...],
              heads: tuple[int, ...] | None = None) -> None:
    """Refuse, before any step, a student that the teacher signal cannot serve; name both values.
    `heads`: the student heads transferred (None: every head); student head h takes teacher head h,
    so a store must hold each of them, in whatever order it holds them."""
    problems = []
    for what, s, t in (("tokens", student.num_tokens, teacher.num_tokens),
                       ("prefix tokens", student.num_prefix_tokens, teacher.num_prefix_tokens),
                       ("patch grid", tuple(student.grid), tuple(teacher.grid)),
                       ("image size", student.image_size, teacher.image_size),
                       ("heads", student.num_heads, teacher.num_heads)):
        if s != t:
            problems.append(f"{what}: student {s}, {teacher.source} {t}")
    if strategy.signal is not Signal.NONE and strategy.signal.value not in teacher.decodes:
        problems.append(f"mode {strategy.name} needs teacher Q/K, but the {teacher.source} {teacher.refusal}: "
                        f"precompute with an exact encoding ({QK_ENCODINGS}) or use a logit mode (copy, distill)")
    elif strategy.signal in (Signal.Q, Signal.K):
        if student.head_dim != teacher.head_dim:
            problems.append(f"head dim: student {student.head_dim}, {teacher.source} {teacher.head_dim}")
    wanted = tuple(range(student.num_heads)) if heads is None else heads
    absent = [h for h in wanted if teacher.heads is not None and h not in teacher.heads]
    if absent and strategy.signal is not Signal.NONE and student.num_heads == teacher.num_heads:
        problems.append(f"heads {absent} are not in the {teacher.source} (it has heads {list(teacher.heads)}): "
                        "student head h takes teacher head h, so pass --heads with held heads (distill modes) "
                        "or precompute every head")
    beyond = [l for l in layers if l >= student.num_layers]
    if beyond:
        problems.append(f"layers {beyond}: the student has only {student.num_layers} layers")
    missing = [l for l in layers if l not in teacher.layers]
    if missing and strategy.signal is not Signal.NONE:
        problems.append(f"layers {missing} are not in the {teacher.source} (it has {list(teacher.layers)})")
    if problems:
        raise StudentMismatch("student does not fit the teacher signal: " + "; ".join(problems))


class CacheSignal:
    """Decodes the batch's cached factors of the transferred layers on the training device, with the
    store encoding's own `decode` (the one the fit check, verify and fidelity use). The store's layer
    and head axes hold `meta["layers"]` / `meta["heads"]` in the order precompute was given them;
    transferred layer i takes store slot layers.index(l_i) and student head h the slot holding teacher
    head h (every head when `heads` is None), so a subset or a reordered store reads the right ones."""

    def __init__(self, meta: dict, layers: tuple[int, ...], signal: Signal, heads: tuple[int, ...] | None = None):
        stored = list(meta["heads"])
        wanted = list(range(int(meta["teacher"]["num_heads"]))) if heads is None else list(heads)
        self.heads = None if wanted == stored else torch.tensor([stored.index(h) for h in wanted])
        self.encoding: Encoding = encoding_from_json(meta["encoding"])
        self.scale = float(meta["teacher"]["scale"])
        self.slots = [meta["layers"].index(l) for l in layers]
        self.signal = signal
        if signal is not Signal.NONE:
            check_signal(self.encoding, signal.value)  # CannotDecode, naming the encoding

    def __call__(self, batch: dict, device) -> list[torch.Tensor]:
        slots = torch.tensor(self.slots)
        arrays = {n: a.index_select(1, slots).to(device, non_blocking=True) for n, a in batch["factors"].items()}
        out = self.encoding.decode(arrays, self.signal.value, self.scale, device)
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

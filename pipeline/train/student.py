"""Student ViT whose attention in chosen layers takes the teacher's, and one strategy per transfer mode.

The student is a plain timm ViT. In each transferred layer its attention module is replaced by a
`TransferAttention` that adopts the original module's submodules under the same names, so the
weights are reused and the state dict keys stay timm's (a checkpoint loads into an unmodified timm
model). What a layer does with the teacher's signal is decided by one small strategy object
(`Copy`, `CopyQ`, `Distill`, ...), never by a mode string passed through the layers:

    probs_BHNN = strategy.probs(q_BHNd, k_BHNd, scale, teacher_signal, record)

The teacher signal of a layer is the teacher's logits [B, H, N, N] (copy, distill) or its Q or K
[B, H, N, d] (copy_q/k, distill_q/k); it comes from the cache or from an online teacher
(`pipeline/train/signals.py`), the strategy cannot tell which.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from attncache.pipeline.teacher.model import (TeacherConfig, TeacherError, _seeded_init, check_supported,
    load_state_dict, resolve_teacher_config)
from attncache.pipeline.teacher.loading import state_dict_misfit
from attncache.pipeline.teacher.selection import default_layers  # noqa: F401 - one default for train and precompute


class Signal(enum.Enum):
    """Which teacher tensor a strategy consumes, per transferred layer."""

    NONE = "none"
    LOGITS = "logits"  # scale * Q K^T, [B, H, N, N]
    Q = "q"  # [B, H, N, d]
    K = "k"


class StudentMismatch(ValueError):
    """The student does not fit the teacher signal (tokens, heads, layers, encoding)."""


# ---------------------------------------------------------------------------------------------- strategies


def _own_logits(q_BHNd: torch.Tensor, k_BHNd: torch.Tensor, scale: float) -> torch.Tensor:
    return (q_BHNd * scale) @ k_BHNd.transpose(-2, -1)


@dataclass(frozen=True)
class Scratch:
    """The student's own attention everywhere; no teacher. `finetune` uses it after loading weights."""

    name = "scratch"
    signal = Signal.NONE
    uses_teacher_at_eval = False

    def probs(self, q_BHNd, k_BHNd, scale, teacher, record):
        return _own_logits(q_BHNd, k_BHNd, scale).softmax(dim=-1)


@dataclass(frozen=True)
class Copy:
    """The layer's attention map is the teacher's softmax(logits); student Q/K are unused there.
    The teacher is needed at evaluation too (the official code copies at test time as well)."""

    name = "copy"
    signal = Signal.LOGITS
    uses_teacher_at_eval = True

    def probs(self, q_BHNd, k_BHNd, scale, teacher_BHNN, record):
        return teacher_BHNN.to(q_BHNd.dtype).softmax(dim=-1)


@dataclass(frozen=True)
class CopyQ:
    """Teacher queries with the student's own keys: softmax(scale * Q_t K_s^T)."""

    name = "copy_q"
    signal = Signal.Q
    uses_teacher_at_eval = True

    def probs(self, q_BHNd, k_BHNd, scale, teacher_q_BHNd, record):
        return _own_logits(teacher_q_BHNd.to(k_BHNd.dtype), k_BHNd, scale).softmax(dim=-1)


@dataclass(frozen=True)
class CopyK:
    """The student's own queries with teacher keys: softmax(scale * Q_s K_t^T)."""

    name = "copy_k"
    signal = Signal.K
    uses_teacher_at_eval = True

    def probs(self, q_BHNd, k_BHNd, scale, teacher_k_BHNd, record):
        return _own_logits(q_BHNd, teacher_k_BHNd.to(q_BHNd.dtype), scale).softmax(dim=-1)


def attention_ce(teacher_logits_BHNN: torch.Tensor, student_logits_BHNN: torch.Tensor) -> torch.Tensor:
    """The paper's distillation loss of one layer: CE(softmax(T), log_softmax(S)) summed over keys,
    averaged over batch, heads and queries (official `distill_loss_fn`), in float32."""
    p_t = teacher_logits_BHNN.float().softmax(dim=-1)
    return -(p_t * torch.log_softmax(student_logits_BHNN.float(), dim=-1)).sum(dim=-1).mean()


@dataclass(frozen=True)
class Distill:
    """The student computes its own attention; the loss pulls its maps towards the teacher's."""

    name = "distill"
    signal = Signal.LOGITS
    uses_teacher_at_eval = False

    def probs(self, q_BHNd, k_BHNd, scale, teacher, record):
        logits = _own_logits(q_BHNd, k_BHNd, scale)
        record(logits)
        return logits.softmax(dim=-1)

    def layer_loss(self, teacher_BHNN, student_BHNN) -> torch.Tensor:
        return attention_ce(teacher_BHNN, student_BHNN)


@dataclass(frozen=True)
class DistillQ:
    """MSE between the student's and the teacher's queries (official `distill_q`)."""

    name = "distill_q"
    signal = Signal.Q
    uses_teacher_at_eval = False

    def probs(self, q_BHNd, k_BHNd, scale, teacher, record):
        record(q_BHNd)
        return _own_logits(q_BHNd, k_BHNd, scale).softmax(dim=-1)

    def layer_loss(self, teacher_BHNd, student_BHNd) -> torch.Tensor:
        return F.mse_loss(student_BHNd.float(), teacher_BHNd.float())


@dataclass(frozen=True)
class DistillK(DistillQ):
    """MSE between the student's and the teacher's keys (official `distill_k`)."""

    name = "distill_k"
    signal = Signal.K

    def probs(self, q_BHNd, k_BHNd, scale, teacher, record):
        record(k_BHNd)
        return _own_logits(q_BHNd, k_BHNd, scale).softmax(dim=-1)


Strategy = Scratch | Copy | CopyQ | CopyK | Distill | DistillQ | DistillK


@dataclass(frozen=True)
class Mode:
    """A user-facing mode: the strategy of the transferred layers and how the student starts."""

    name: str
    strategy: Strategy
    init_from_teacher: bool = False

    @property
    def distills(self) -> bool:
        return self.strategy.signal is not Signal.NONE and not self.strategy.uses_teacher_at_eval


MODES = {m.name: m for m in (Mode("scratch", Scratch()), Mode("finetune", Scratch(), init_from_teacher=True),
                             Mode("copy", Copy()), Mode("copy_q", CopyQ()), Mode("copy_k", CopyK()),
                             Mode("distill", Distill()), Mode("distill_q", DistillQ()),
                             Mode("distill_k", DistillK()))}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    return MODES[name]


# ---------------------------------------------------------------------------------------------- attention


class TransferContext:
    """Per-step teacher signals and student records shared by the transferred layers.

    `teacher[i]` is the signal of the i-th transferred layer (set before each forward);
    `records[i]` is what the strategy recorded there (student logits, Q or K) for the loss.
    `heads` (distill modes) names the student heads the teacher signal covers, in its order; the
    other heads are left free. None: every head.
    """

    def __init__(self, num_layers: int, heads: tuple[int, ...] | None = None):
        self.num_layers = num_layers
        self.heads = heads
        self.teacher: list[torch.Tensor | None] = [None] * num_layers
        self.records: list[torch.Tensor | None] = [None] * num_layers

    def set_teacher(self, signals: list[torch.Tensor] | None) -> None:
        if signals is not None and len(signals) != self.num_layers:
            raise ValueError(f"{len(signals)} teacher signals for {self.num_layers} transferred layers")
        self.teacher = list(signals) if signals is not None else [None] * self.num_layers
        self.records = [None] * self.num_layers


class TransferAttention(nn.Module):
    """timm's `Attention` computation with the attention map coming from a strategy.

    Adopts the wrapped module's submodules under the same names (state dict keys unchanged) and
    reproduces its forward exactly (qkv, q/k norm, scale, attn_drop, norm, gate, proj)."""

    def __init__(self, inner: nn.Module, slot: int, strategy: Strategy, context: TransferContext):
        super().__init__()
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(inner, name, None) or nn.Identity())
        self.gate = getattr(inner, "gate", None)
        self.num_heads, self.head_dim, self.scale = inner.num_heads, inner.head_dim, inner.scale
        self.attn_dim = getattr(inner, "attn_dim", inner.num_heads * inner.head_dim)
        self.slot, self.strategy = slot, strategy
        self._context = [context]  # a list: not a submodule, not in the state dict

    @property
    def context(self) -> TransferContext:
        return self._context[0]

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention transfer does not support attention masks")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        teacher = self.context.teacher[self.slot]
        if teacher is None and self.strategy.signal is not Signal.NONE and self.strategy.uses_teacher_at_eval:
            raise RuntimeError(f"{self.strategy.name}: transferred layer {self.slot} got no teacher signal")

        def record(t: torch.Tensor) -> None:
            self.context.records[self.slot] = t

        probs = self.strategy.probs(q, k, self.scale, teacher, record)
        out = self.attn_drop(probs) @ v
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


# ---------------------------------------------------------------------------------------------- student


@dataclass(frozen=True)
class StudentConfig:
    name: str
    model_args: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 8
    drop_path: float = 0.0
    seed: int = 0
    initial_checkpoint: str | None = None  # timm --initial-checkpoint: weights to start from (every key, every shape)


@dataclass(frozen=True)
class Geometry:
    """What a teacher signal must agree on with the student."""

    num_layers: int
    num_heads: int
    head_dim: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    image_size: int

    @classmethod
    def of(cls, model: nn.Module) -> "Geometry":
        attn = model.blocks[0].attn
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        return cls(len(model.blocks), int(attn.num_heads), int(attn.head_dim), prefix + grid[0] * grid[1], prefix,
                   grid, int(model.patch_embed.img_size[0]))


def build_student(cfg: StudentConfig, init_from: TeacherConfig | None = None) -> nn.Module:
    """A timm ViT, seeded without touching the caller's global RNG; drop path on the student only.
    `init_from` loads a teacher's weights (the `finetune` baseline), head excluded when classes differ."""
    kwargs = dict(cfg.model_args)
    with _seeded_init(cfg.seed):
        model = timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes,
                                  drop_path_rate=cfg.drop_path, **kwargs)
    check_supported(model, cfg.name)
    if cfg.initial_checkpoint:
        load_initial_weights(model, cfg)
    if init_from is not None:
        resolved = resolve_teacher_config(init_from)
        if not resolved.checkpoint:
            raise StudentMismatch("finetune needs teacher weights: a teacher directory or --teacher-checkpoint")
        state = load_state_dict(resolved.checkpoint)
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape and k.startswith("head"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.startswith("head")]
        if missing or unexpected:
            raise StudentMismatch(f"teacher weights {resolved.checkpoint} do not fit student {cfg.name}: "
                                  f"missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    return model


def load_initial_weights(model: nn.Module, cfg: StudentConfig) -> None:
    """`--initial-checkpoint`: the student starts from these weights, all of them: a key missing or
    a shape that differs would leave a student half initialised, so it is refused in one line naming
    the first few. Read as load_state_dict reads teachers (safetensors, or weights_only=True)."""
    try:
        state = load_state_dict(cfg.initial_checkpoint)
    except TeacherError as exc:
        raise StudentMismatch(f"--initial-checkpoint: {exc}") from None
    missing, unexpected, shapes = state_dict_misfit(model, state)
    if missing or unexpected or shapes:
        raise StudentMismatch(f"--initial-checkpoint {cfg.initial_checkpoint} does not fit student {cfg.name} "
                              f"{dict(cfg.model_args)} with {cfg.num_classes} classes: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}, shapes differ {shapes[:4]}")
    model.load_state_dict(state, strict=True)


def install_transfer(model: nn.Module, layers: tuple[int, ...], strategy: Strategy,
                     heads: tuple[int, ...] | None = None) -> TransferContext:
    """Replace the attention of `layers` (student block indices) with TransferAttention."""
    context = TransferContext(len(layers), heads)
    if strategy.signal is Signal.NONE:
        return context
    for slot, layer in enumerate(layers):
        block = model.blocks[layer]
        block.attn = TransferAttention(block.attn, slot, strategy, context)
    return context


def transfer_loss(strategy: Strategy, context: TransferContext) -> torch.Tensor | None:
    """Sum over transferred layers of the strategy's layer loss (None when it has none)."""
    if strategy.signal is Signal.NONE or strategy.uses_teacher_at_eval:
        return None
    total = None
    for slot, (teacher, student) in enumerate(zip(context.teacher, context.records)):
        if teacher is None or student is None:
            raise RuntimeError(f"transferred layer {slot}: missing teacher signal or student record")
        if context.heads is not None:
            student = student[:, list(context.heads)]
        loss = strategy.layer_loss(teacher, student)
        total = loss if total is None else total + loss
    return total

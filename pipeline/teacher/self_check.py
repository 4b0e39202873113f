"""The teacher self-check: are the captured Q/K the attention the teacher really computes?

The cache stores Q and K (or factors of scale * Q K^T) and every reader rebuilds the attention as
softmax(scale * Q K^T). That is only the teacher's attention when its logits are nothing else:
relative-position bias (timm `vit_relpos_*`, `vit_srelpos_*`), rotary embeddings applied after
q_norm/k_norm (EVA-02), ALiBi, masks or any other term would be left out silently, and
`verify --recompute` would agree with the wrong cache, since it reruns the same capture.

So before any job uses a teacher, one small deterministic batch goes through the model with the
capture hooks on, and every block's attention module is replayed on the input it really got, with
`scaled_dot_product_attention` swapped for softmax(scale * Q_cap K_cap^T) V computed in float64 from
the captured Q/K and the module's own V; the module's own norm, gate and proj then run as usual.
If the replayed output differs from the module's real output by more than float rounding, the
teacher's logits are not scale * Q K^T and the teacher is refused. The model decides, not its name.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# max |real - replayed| / max |real| over a layer's output. float32 attention against a float64
# replay differs by ~1e-7 here (1e-6 on 197-token teachers); a relative-position bias of timm's
# initial size (std 0.02) already moves outputs by > 1e-3, a trained one or RoPE by ~1e-1.
TOLERANCE = 1e-4
PROBE_BATCH = 1
PROBE_SEED = 0


@dataclass(frozen=True)
class LayerCheck:
    layer: int
    difference: float | None  # None: the layer's attention never called scaled_dot_product_attention
    note: str = ""


def probe_images(image_size: int, batch: int = PROBE_BATCH, seed: int = PROBE_SEED) -> torch.Tensor:
    """A fixed batch of normalised-looking pixels [B, 3, S, S]; its own generator, so no global state moves."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=gen)


@contextmanager
def _full_fp32():
    """TF32 matmuls would blur the comparison by ~1e-3: off for the check, restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def _record_attention(attns: list[torch.nn.Module]):
    """Each attention module's real call: positional args, keyword args and output."""
    records: list[dict] = [{} for _ in attns]
    handles = []
    for rec, attn in zip(records, attns):
        def pre(_m, args, kwargs, rec=rec):
            rec["args"], rec["kwargs"] = tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)

        def post(_m, _args, _kwargs, out, rec=rec):
            rec["out"] = out.clone() if torch.is_tensor(out) else None
        handles += [attn.register_forward_pre_hook(pre, with_kwargs=True),
                    attn.register_forward_hook(post, with_kwargs=True)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _sdpa_from_capture(q_BHNd: torch.Tensor, k_BHNd: torch.Tensor, scale: float, calls: list):
    """Swap torch's scaled_dot_product_attention for the attention the cache implies (float64),
    whatever q, k, mask or bias the module passes: only V is taken from the call."""
    original = F.scaled_dot_product_attention

    def cached_attention(_query, _key, value, *_args, **_kwargs):
        calls.append(1)
        logits = scale * q_BHNd.double() @ k_BHNd.double().transpose(-1, -2)
        return (logits.softmax(dim=-1) @ value.double()).to(value.dtype)

    F.scaled_dot_product_attention = cached_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _replay(attn: torch.nn.Module, record: dict, q_BHNd, k_BHNd, scale: float) -> LayerCheck | torch.Tensor:
    fused = getattr(attn, "fused_attn", None)
    calls: list = []
    try:
        if fused is not None:
            attn.fused_attn = True  # timm's switch to the scaled_dot_product_attention path
        with _sdpa_from_capture(q_BHNd, k_BHNd, scale, calls):
            out = attn(*record["args"], **record["kwargs"])
    except RuntimeError as exc:  # e.g. V with fewer heads than Q (grouped KV): not the cached layout
        return LayerCheck(-1, None, f"replaying its attention failed ({str(exc).splitlines()[0]})")
    finally:
        if fused is not None:
            attn.fused_attn = fused
    if not calls:
        return LayerCheck(-1, None, "its attention does not go through scaled_dot_product_attention")
    return out


def check_layers(attns: list[torch.nn.Module], capture: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 images_BCHW: torch.Tensor, scale: float) -> list[LayerCheck]:
    """One check per attention module: `capture(images)` must return Q, K [B, L, H, N, d] for
    all L modules, all heads, exactly as the cache is filled."""
    with torch.inference_mode(), _full_fp32():
        with _record_attention(attns) as records:
            q, k = capture(images_BCHW)
        results = []
        for layer, (attn, rec) in enumerate(zip(attns, records)):
            if "out" not in rec or rec["out"] is None:
                results.append(LayerCheck(layer, None, "its attention module was not called as a tensor function"))
                continue
            out = _replay(attn, rec, q[:, layer], k[:, layer], scale)
            if isinstance(out, LayerCheck):
                results.append(LayerCheck(layer, None, out.note))
                continue
            real = rec["out"].double()
            diff = (real - out.double()).abs().max() / real.abs().max().clamp_min(1e-30)
            results.append(LayerCheck(layer, float(diff) if torch.isfinite(diff) else float("inf")))
    return results


def first_failure(results: list[LayerCheck], tolerance: float = TOLERANCE) -> str | None:
    """The one line that refuses the teacher, or None when every layer's attention is scale * Q K^T."""
    for r in results:
        if r.difference is None:
            return (f"self-check cannot confirm layer {r.layer}: {r.note}; the cached Q/K might not be the "
                    "attention it computes")
        if not r.difference <= tolerance:
            return (f"self-check failed at layer {r.layer}: its real attention output differs from "
                    f"softmax(scale * Q K^T) V built from the captured Q/K by {r.difference:.2e} "
                    f"(relative max, tolerance {tolerance:.0e}): its attention logits are not scale * Q K^T "
                    "(relative-position bias, rotary embeddings, ...), so a cache would hold the wrong attention")
    return None

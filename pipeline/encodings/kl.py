"""Fidelity arithmetic shared by precompute's self-check, `fidelity`, `verify --recompute` and the demo."""
from __future__ import annotations

import torch


def exact_logits(q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> torch.Tensor:
    return (q_BLHNd.float() * scale) @ k_BLHNd.float().transpose(-1, -2)


def attention_kl(ref_logits: torch.Tensor, est_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(est)) per layer, averaged over samples, heads and queries: [L].

    Inputs are [B, L, H, N, N]; the result's axis is the layer axis.
    """
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(est_logits.double(), dim=-1)
    kl_BLHN = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl_BLHN.mean(dim=(0, 2, 3)).float()

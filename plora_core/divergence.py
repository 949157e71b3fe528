"""Feature-distribution divergences for the KL gate (paper Eq. 11-12, Table 4).

A layer output is read as one categorical distribution per token: the softmax over
channels (the last dim of a Linear output, dim 1 of a Conv output). Each function
returns one number per batch sample, the divergence averaged over that sample's
tokens, so CFG's cond and uncond rows (and different prompts in one batch) decide
separately. Everything is computed in float32 with log-softmax.
"""

from __future__ import annotations

from typing import Callable

import torch

# (tuned [B, ...], base [B, ...], channel_dim) -> [B]
Divergence = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _per_sample_mean(per_token: torch.Tensor) -> torch.Tensor:
    """Average a [B, ...] per-token value over everything but the batch dim."""
    return per_token.reshape(per_token.shape[0], -1).mean(dim=1)


def log_distribution(features: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """log softmax over channels, in float32."""
    return torch.log_softmax(features.float(), dim=channel_dim)


def kl_from_log_probs(log_p_tuned: torch.Tensor, log_p_base: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """KL(P_tuned || P_base) per sample from log-probabilities (Eq. 11-12)."""
    per_token = (log_p_tuned.exp() * (log_p_tuned - log_p_base)).sum(dim=channel_dim)
    return _per_sample_mean(per_token)


def kl_divergence(tuned: torch.Tensor, base: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """d = KL(softmax(F_hat) || softmax(F)), Eq. 11-12; the paper's criterion."""
    return kl_from_log_probs(log_distribution(tuned, channel_dim), log_distribution(base, channel_dim), channel_dim)


def js_divergence(tuned: torch.Tensor, base: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Jensen-Shannon divergence of the two channel distributions (Table 4)."""
    log_p = log_distribution(tuned, channel_dim)
    log_q = log_distribution(base, channel_dim)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
    return 0.5 * (kl_from_log_probs(log_p, log_m, channel_dim) + kl_from_log_probs(log_q, log_m, channel_dim))


def cosine_distance(tuned: torch.Tensor, base: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """1 - cos(F_hat, F) per token over channels, averaged per sample (Table 4)."""
    cos = torch.nn.functional.cosine_similarity(tuned.float(), base.float(), dim=channel_dim, eps=1e-8)
    return _per_sample_mean(1.0 - cos)


DIVERGENCES: dict[str, Divergence] = {
    "kl": kl_divergence,
    "js": js_divergence,
    "cosine": cosine_distance,
}


def get_divergence(name: str) -> Divergence:
    """Look a criterion up by name; the error lists the valid ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"Unknown P-LoRA criterion {name!r}; choose one of {sorted(DIVERGENCES)}.") from None

"""The posterior-feature-knowledge gate (paper section 4.1, Eq. 9-13)."""

from __future__ import annotations

import torch

from .divergence import get_divergence, kl_from_log_probs, log_distribution


def feature_divergences(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor,
                        criterion: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12: how far each LoRA moved the layer's distribution.

    For KL the base log-distribution is computed once and shared by both terms.
    """
    if criterion == "kl":
        log_base = log_distribution(base, channel_dim)
        d_subject = kl_from_log_probs(log_distribution(subject_out, channel_dim), log_base, channel_dim)
        d_style = kl_from_log_probs(log_distribution(style_out, channel_dim), log_base, channel_dim)
        return d_subject, d_style
    divergence = get_divergence(criterion)
    return divergence(subject_out, base, channel_dim), divergence(style_out, base, channel_dim)


def choose_subject(d_subject: torch.Tensor, d_style: torch.Tensor, style_bias: float = 1.0) -> torch.Tensor:
    """Eq. 13 as a [B] bool mask: True where d_c >= style_bias * d_s (style_bias 1 = paper)."""
    return d_subject >= d_style * style_bias


def select_features(subject_out: torch.Tensor, style_out: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """F^{i+1} per sample: F_hat_c where the mask is True, else F_hat_s (Eq. 13)."""
    mask = subject_mask.reshape(-1, *([1] * (subject_out.ndim - 1)))
    return torch.where(mask, subject_out, style_out)


def gate(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor, criterion: str = "kl",
         style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11-13 for one layer: returns (selected output, [B] mask of samples that took the subject)."""
    d_subject, d_style = feature_divergences(base, subject_out, style_out, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return select_features(subject_out, style_out, subject_mask), subject_mask

"""The posterior-feature-knowledge gate (paper section 4.1, Eq. 9-13)."""

from __future__ import annotations

import torch

from .divergence import get_divergence


def feature_divergences(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor,
                        criterion: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12: how far each LoRA moved the layer's distribution."""
    divergence = get_divergence(criterion)
    return divergence(subject_out, base, channel_dim), divergence(style_out, base, channel_dim)


def choose_subject(d_subject: torch.Tensor, d_style: torch.Tensor, style_bias: float = 1.0) -> torch.Tensor:
    """Eq. 13 as a [B] bool mask: True where d_c >= style_bias * d_s (style_bias 1 = paper)."""
    return d_subject >= d_style * style_bias


def select_features(subject_out: torch.Tensor, style_out: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """F^{i+1} per sample: F_hat_c where the mask is True, else F_hat_s (Eq. 13)."""
    mask = subject_mask.reshape(-1, *([1] * (subject_out.ndim - 1)))
    return torch.where(mask, subject_out, style_out)


def log_normaliser(features32: torch.Tensor, log_probs: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """logsumexp over channels, read off a log-softmax: lse = z_0 - log_softmax(z)_0 (fused kernel, cheap)."""
    return features32.select(channel_dim, 0) - log_probs.select(channel_dim, 0)


def kl_of_shift(base32: torch.Tensor, lse_base: torch.Tensor, delta: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """KL(softmax(F + D) || softmax(F)) per sample (Eq. 11-12), in few passes over the output.

    With z = F + D: KL = sum_c softmax(z)_c * D_c - (logsumexp(z) - logsumexp(F)), the same
    value as the definition; this is the gate's hot path, so it avoids extra temporaries.
    """
    delta32 = delta.float()
    shifted = base32 + delta32  # [B, ..., C]
    log_probs = torch.log_softmax(shifted, dim=channel_dim)
    lse_shift = log_normaliser(shifted, log_probs, channel_dim) - lse_base
    expected_delta = log_probs.exp_().mul_(delta32).sum(dim=channel_dim)
    per_token = expected_delta - lse_shift
    return per_token.reshape(per_token.shape[0], -1).mean(dim=1)


def gate_deltas(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor, criterion: str = "kl",
                style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9-13 from F and the two LoRA deltas; same result as `gate(F, F + D_c, F + D_s)`.

    Only the chosen output is formed: F + D_c for samples that take the subject, else F + D_s.
    """
    if criterion == "kl":
        base32 = base.float()
        lse_base = log_normaliser(base32, torch.log_softmax(base32, dim=channel_dim), channel_dim)
        d_subject = kl_of_shift(base32, lse_base, subject_delta, channel_dim)
        d_style = kl_of_shift(base32, lse_base, style_delta, channel_dim)
    else:
        d_subject, d_style = feature_divergences(base, base + subject_delta, base + style_delta, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return select_features(subject_delta, style_delta, subject_mask).add_(base), subject_mask


def gate(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor, criterion: str = "kl",
         style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11-13 for one layer: returns (selected output, [B] mask of samples that took the subject)."""
    d_subject, d_style = feature_divergences(base, subject_out, style_out, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return select_features(subject_out, style_out, subject_mask), subject_mask

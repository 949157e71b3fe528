"""The posterior-feature-knowledge gate (paper section 4.1, Eq. 9-13)."""

from __future__ import annotations

import torch

from .divergence import get_shift_divergence


def delta_divergences(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                      criterion: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12, from F and the two LoRA deltas (F_hat = F + D).

    F + D is never formed: each criterion works from F and D (see `divergence`), sharing the
    work on F (the softmax over channels) between the two LoRAs.
    """
    d_subject, d_style = get_shift_divergence(criterion)(base, (subject_delta, style_delta), channel_dim)
    return d_subject, d_style


def feature_divergences(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor,
                        criterion: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_c, d_s) per sample, Eq. 11-12, from materialised outputs F_hat_c and F_hat_s."""
    base32 = base.float()
    return delta_divergences(base32, subject_out.float() - base32, style_out.float() - base32, criterion,
                             channel_dim)


def choose_subject(d_subject: torch.Tensor, d_style: torch.Tensor, style_bias: float = 1.0) -> torch.Tensor:
    """Eq. 13 as a [B] bool mask: True where d_c >= style_bias * d_s (style_bias 1 = paper)."""
    return d_subject >= d_style * style_bias


def select_features(subject_out: torch.Tensor, style_out: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """F^{i+1} per sample: F_hat_c where the mask is True, else F_hat_s (Eq. 13)."""
    mask = subject_mask.reshape(-1, *([1] * (subject_out.ndim - 1)))
    return torch.where(mask, subject_out, style_out)


def gate_deltas(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor, criterion: str = "kl",
                style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9-13 from F and the two LoRA deltas; the result of `gate(F, F + D_c, F + D_s)`.

    Only the chosen output is formed, in the model's dtype: F + D_c for samples that take the
    subject, else F + D_s. The deltas are read, never modified.
    """
    d_subject, d_style = delta_divergences(base, subject_delta, style_delta, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return add_selected(base, subject_delta, style_delta, subject_mask), subject_mask


def add_selected(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                 subject_mask: torch.Tensor) -> torch.Tensor:
    """F + D_c for samples where the mask is True, else F + D_s (Eq. 13), in one pass over F."""
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (base, subject_delta, style_delta))
    if differentiable or not base.is_cpu:  # torch.where: autograd, and no host sync on accelerators
        return select_features(subject_delta, style_delta, subject_mask).add_(base)
    out = torch.empty(base.shape, dtype=torch.result_type(base, subject_delta), device=base.device)
    for sample, take_subject in enumerate(subject_mask.tolist()):
        torch.add(base[sample], (subject_delta if take_subject else style_delta)[sample], out=out[sample])
    return out


def gate(base: torch.Tensor, subject_out: torch.Tensor, style_out: torch.Tensor, criterion: str = "kl",
         style_bias: float = 1.0, channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11-13 for one layer: returns (selected output, [B] mask of samples that took the subject)."""
    d_subject, d_style = feature_divergences(base, subject_out, style_out, criterion, channel_dim)
    subject_mask = choose_subject(d_subject, d_style, style_bias)
    return select_features(subject_out, style_out, subject_mask), subject_mask

"""Posterior metrics knowledge (PMK): the guidance score R of Eq. 16-19 on the decoded x0_hat.

    S_clip_content = cos(E_clip(I_c_ref), E_clip(x0_hat))                          (Eq. 16)
    S_clip_style   = cos(E_clip(I_s_ref), E_clip(x0_hat))                          (Eq. 17)
    S_dino_style   = cos(E_dino(I_s_ref), E_dino(x0_hat))                          (Eq. 18)
    R = 1 - (w1 S_clip_content + w2 S_clip_style + w3 S_dino_style) / (w1 + w2 + w3)   (Eq. 19)

The paper weighs the three terms equally (w = 1, 1, 1). A zero weight skips its term and the
encoder call behind it. With several reference images the cosine to each is averaged.

Beyond the paper, a set of N LoRAs has one reference per LoRA (rendered by that LoRA alone with
its own prompt, as Eq. 14-15 do for two), each with a role and a weight a_r. Eq. 19 is extended
over them, the subjects' references taking the content term and the styles' the style terms:

    R = 1 - [w1 sum_{r in subj} a_r S_clip(r) + sum_{r in style} a_r (w2 S_clip(r) + w3 S_dino(r))]
            / [w1 sum_{r in subj} a_r + (w2 + w3) sum_{r in style} a_r]

With one subject and one style reference at a = 1 this is Eq. 19; a reference at a = 0 drops out.
Images are [B, 3, H, W] in [0, 1] (see `image_preprocess.to_nchw`); any size, since the
encoders resize.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoders import ImageEncoder

logger = logging.getLogger("plora")

CLIP_CONTENT = "clip_content"  # Eq. 16
CLIP_STYLE = "clip_style"      # Eq. 17
DINO_STYLE = "dino_style"      # Eq. 18
TERMS = (CLIP_CONTENT, CLIP_STYLE, DINO_STYLE)
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)


SUBJECT_ROLE, STYLE_ROLE = "subject", "style"
ROLES = (SUBJECT_ROLE, STYLE_ROLE)


@dataclass(frozen=True)
class RoleReference:
    """One more LoRA's reference (beyond the paper's two): its role, its weight a_r, its embeddings."""

    role: str
    weight: float
    clip: torch.Tensor | None = None  # [N_r, D_clip]
    dino: torch.Tensor | None = None  # [N_r, D_dino] (styles)


@dataclass(frozen=True)
class ReferenceEmbeddings:
    """Unit-norm embeddings of I_c_ref and I_s_ref (Eq. 14-15), computed once per sampling run, and of
    the references of any further LoRAs of the set (`more`)."""

    clip_subject: torch.Tensor | None = None  # [N_c, D_clip]
    clip_style: torch.Tensor | None = None    # [N_s, D_clip]
    dino_style: torch.Tensor | None = None    # [N_s, D_dino]
    more: tuple[RoleReference, ...] = ()


def _embed_constant(encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings without a graph, as ordinary tensors even when called under inference mode."""
    with torch.inference_mode(False), torch.no_grad():
        return F.normalize(encoder.embed(images.clone()), dim=-1)  # [N, D]


def embed_references(clip_encoder: ImageEncoder | None, dino_encoder: ImageEncoder | None,
                     subject_images: torch.Tensor | None, style_images: torch.Tensor | None) -> ReferenceEmbeddings:
    """E_CLIP(I_c_ref), E_CLIP(I_s_ref), E_DINO(I_s_ref) of Eq. 16-18; an entry is None when its input is."""
    clip_subject = clip_style = dino_style = None
    if clip_encoder is not None and subject_images is not None:
        clip_subject = _embed_constant(clip_encoder, subject_images)
    if clip_encoder is not None and style_images is not None:
        clip_style = _embed_constant(clip_encoder, style_images)
    if dino_encoder is not None and style_images is not None:
        dino_style = _embed_constant(dino_encoder, style_images)
    return ReferenceEmbeddings(clip_subject, clip_style, dino_style)


def embed_more_references(clip_encoder: ImageEncoder | None, dino_encoder: ImageEncoder | None,
                          references) -> tuple[RoleReference, ...]:
    """RoleReferences of (role, weight, images [N, 3, H, W]) entries; DINO only for styles (Eq. 18)."""
    embedded = []
    for role, weight, images in references:
        if role not in ROLES:
            raise ValueError(f"A reference's role must be {' or '.join(ROLES)}, not {role!r}.")
        clip = _embed_constant(clip_encoder, images) if clip_encoder is not None and weight > 0 else None
        dino = (_embed_constant(dino_encoder, images) if dino_encoder is not None and role == STYLE_ROLE
                and weight > 0 else None)
        embedded.append(RoleReference(role, float(weight), clip, dino))
    return tuple(embedded)


def mean_cosine(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Sim_cos of Eq. 16-18 averaged over the references: [B, D] and unit-norm [N, D] -> [B]."""
    unit = F.normalize(embeddings, dim=-1)  # [B, D]
    return (unit @ references.to(unit).T).mean(dim=-1)  # [B, N] -> [B]


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """Three finite, non-negative weights (w1 clip content, w2 clip style, w3 dino style) with a positive sum."""
    values = tuple(float(w) for w in weights)
    if len(values) != 3 or not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(
            f"Metric weights must be three finite numbers >= 0 with a positive sum "
            f"(clip content, clip style, dino style), got {tuple(weights)}."
        )
    return values


def residual_eq19(terms: dict[str, torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """R = 1 - sum_k w_k S_k / sum_k w_k (Eq. 19) over the terms with a non-zero weight. [B]"""
    named = {name: w for name, w in zip(TERMS, check_weights(weights)) if w > 0}
    weighted = sum(w * terms[name] for name, w in named.items())
    return 1.0 - weighted / sum(named.values())


def _require(value, what: str, weight_name: str, fix: str):
    if value is None:
        raise ValueError(f"The {weight_name} weight is above 0 but {what} is missing; {fix}, or set that weight to 0.")
    return value


def metric_residual(x0_images_nchw_01: torch.Tensor, clip_encoder: ImageEncoder | None,
                    dino_encoder: ImageEncoder | None, refs: ReferenceEmbeddings,
                    weights: Sequence[float] = DEFAULT_WEIGHTS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """R(x0_hat) of Eq. 19 (extended over `refs.more`, see the module) and its similarity terms (Eq. 16-18),
    each [B]; differentiable in the pixels.

    `terms` holds only the terms with a non-zero weight, keyed CLIP_CONTENT, CLIP_STYLE, DINO_STYLE; with
    more references, each term is the a-weighted mean over the references of its role.
    For a gradient, call with grad enabled and outside inference mode.
    """
    w_content, w_style, w_dino = check_weights(weights)
    if not refs.more:
        return _pair_residual(x0_images_nchw_01, clip_encoder, dino_encoder, refs, (w_content, w_style, w_dino))
    return _set_residual(x0_images_nchw_01, clip_encoder, dino_encoder, refs, (w_content, w_style, w_dino))


def _pair_residual(x0, clip_encoder, dino_encoder, refs, weights):
    """Eq. 16-19 as the paper writes them: one subject and one style reference."""
    w_content, w_style, w_dino = weights
    terms: dict[str, torch.Tensor] = {}
    if w_content > 0 or w_style > 0:
        encoder = _require(clip_encoder, "a CLIP encoder", "CLIP", "load a CLIP model")
        clip_x0 = encoder.embed(x0)  # [B, D_clip]
        if w_content > 0:
            subject = _require(refs.clip_subject, "a subject reference image", "CLIP content", "connect I_c_ref")
            terms[CLIP_CONTENT] = mean_cosine(clip_x0, subject)  # Eq. 16
        if w_style > 0:
            style = _require(refs.clip_style, "a style reference image", "CLIP style", "connect I_s_ref")
            terms[CLIP_STYLE] = mean_cosine(clip_x0, style)  # Eq. 17
    if w_dino > 0:
        encoder = _require(dino_encoder, "a DINO encoder", "DINO style", "load a DINO model")
        style = _require(refs.dino_style, "a style reference image embedded with DINO", "DINO style",
                         "connect I_s_ref and embed it with the DINO encoder")
        terms[DINO_STYLE] = mean_cosine(encoder.embed(x0), style)  # Eq. 18
    return residual_eq19(terms, weights), terms


def _set_residual(x0, clip_encoder, dino_encoder, refs, weights):
    """The extended Eq. 19 over the pair's references (a = 1) and `refs.more` (see the module)."""
    w_content, w_style, w_dino = weights
    references = [RoleReference(SUBJECT_ROLE, 1.0, refs.clip_subject), RoleReference(STYLE_ROLE, 1.0, refs.clip_style,
                                                                                    refs.dino_style)]
    references += [r for r in refs.more if r.weight > 0]
    # (term, its weight w, the references it is taken over, which embedding)
    plan = [(CLIP_CONTENT, w_content, SUBJECT_ROLE, "clip"), (CLIP_STYLE, w_style, STYLE_ROLE, "clip"),
            (DINO_STYLE, w_dino, STYLE_ROLE, "dino")]
    plan = [(term, w, [r for r in references if r.role == role and r.weight > 0], kind)
            for term, w, role, kind in plan if w > 0]
    plan = [(term, w, chosen, kind) for term, w, chosen, kind in plan if chosen]
    embedded = {}
    numerator, denominator, terms = 0.0, 0.0, {}
    for term, w, chosen, kind in plan:
        if kind not in embedded:
            encoder = (_require(clip_encoder, "a CLIP encoder", "CLIP", "load a CLIP model") if kind == "clip" else
                       _require(dino_encoder, "a DINO encoder", "DINO style", "load a DINO model"))
            embedded[kind] = encoder.embed(x0)
        total, weight_sum = 0.0, 0.0
        for reference in chosen:
            value = getattr(reference, kind)
            value = _require(value, f"a {reference.role} reference image embedded with {kind.upper()}",
                             term.replace("_", " "), f"connect the {reference.role} reference")
            total = total + reference.weight * mean_cosine(embedded[kind], value)
            weight_sum += reference.weight
        terms[term] = total / weight_sum
        numerator = numerator + w * total
        denominator += w * weight_sum
    if not terms:
        raise ValueError("The score has no term to measure: every reference of a weighted role has weight 0.")
    return 1.0 - numerator / denominator, terms

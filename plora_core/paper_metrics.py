"""The paper's evaluation metrics (Tables 1 and 3-5): Style Sim, CLIP Score and DINO Score of an image.

Section 5.1.1: "CLIP is employed to evaluate both the style alignment (Style Sim) and content
preservation (CLIP Score), while DINO is used to measure content consistency via DINO Score",
following K-LoRA and ZipLoRA. All three are cosine similarities of image embeddings:

    Style Sim  = cos(E_CLIP(I), E_CLIP(I_style_ref))      CLIP image tower, to the style reference
    CLIP Score = cos(E_CLIP(I), E_CLIP(I_subject_ref))    CLIP image tower, to the subject reference
    DINO Score = cos(E_DINO(I), E_DINO(I_subject_ref))    DINO CLS token, to the subject reference

E_CLIP is open_clip's `encode_image` (the projected image embedding), E_DINO the CLS token after
the last layer norm (`plora_core.encoders`); embeddings are L2-normalised before the dot product,
in float64. With several reference images per role the cosines to each are averaged. The paper
reports the mean over images in percent (cosine x 100).

Unlike the guidance score R (Eq. 16-19, `scores.py`), which compares DINO to the *style*
reference, the evaluation's DINO Score compares to the *subject* reference.
Images are [B, 3, H, W] in [0, 1] (see `image_preprocess.to_nchw`); any size, the encoders resize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoders import ImageEncoder

STYLE_SIM = "style_sim"
CLIP_SCORE = "clip_score"
DINO_SCORE = "dino_score"
METRICS = (STYLE_SIM, CLIP_SCORE, DINO_SCORE)
LABELS = {STYLE_SIM: "Style Sim", CLIP_SCORE: "CLIP Score", DINO_SCORE: "DINO Score"}
EMBED_CHUNK = 16  # images per encoder call


@dataclass(frozen=True)
class PaperScores:
    """Per-image metrics, each [B] float64 cosine similarities in [-1, 1]."""

    style_sim: torch.Tensor
    clip_score: torch.Tensor
    dino_score: torch.Tensor

    def per_image(self) -> list[dict[str, float]]:
        """One {metric: cosine} dict per image, in batch order."""
        return [{name: float(getattr(self, name)[i]) for name in METRICS} for i in range(len(self.style_sim))]

    def means(self) -> dict[str, float]:
        """{metric: mean cosine over the batch}: the number a table cell of the paper reports (x 100)."""
        return {name: float(getattr(self, name).mean()) for name in METRICS}


def unit_embeddings(encoder: ImageEncoder, images_nchw_01: torch.Tensor,
                    should_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """E(images) / |E(images)|: [N, 3, H, W] in [0, 1] -> [N, D] float64 on the CPU (MPS has no
    float64), no autograd graph. `should_stop()` before each chunk raises to abandon the work."""
    if images_nchw_01.shape[0] == 0:
        raise ValueError(f"No images to embed with {encoder.name}: the batch is empty.")
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images_nchw_01), EMBED_CHUNK):
            if should_stop is not None:
                should_stop()
            chunks.append(encoder.embed(images_nchw_01[i:i + EMBED_CHUNK]))
    return F.normalize(torch.cat(chunks).cpu().double(), dim=-1)  # [N, D]


def mean_cosine_to_references(units: torch.Tensor, reference_units: torch.Tensor) -> torch.Tensor:
    """Cosine of each image to each reference, averaged over the references: [B, D], [N, D] -> [B]."""
    return (units @ reference_units.to(units).T).mean(dim=-1)  # [B, N] -> [B]


def paper_scores(images: torch.Tensor, subject_references: torch.Tensor, style_references: torch.Tensor,
                 clip_encoder: ImageEncoder, dino_encoder: ImageEncoder,
                 should_stop: Callable[[], None] | None = None) -> PaperScores:
    """Style Sim, CLIP Score and DINO Score (Table 1) of every image; all inputs [N, 3, H, W] in [0, 1].
    `should_stop()` is called between encoder calls (ComfyUI's interruption)."""
    def embed(encoder, batch):
        return unit_embeddings(encoder, batch, should_stop)

    clip_images = embed(clip_encoder, images)  # [B, D_clip]
    style_sim = mean_cosine_to_references(clip_images, embed(clip_encoder, style_references))
    clip_score = mean_cosine_to_references(clip_images, embed(clip_encoder, subject_references))
    dino_score = mean_cosine_to_references(embed(dino_encoder, images), embed(dino_encoder, subject_references))
    return PaperScores(style_sim, clip_score, dino_score)


def format_table(scores: PaperScores) -> str:
    """A text table: one row per image and the mean, in percent (cosine x 100) as the paper prints them."""
    header = ["image", *(LABELS[name] for name in METRICS)]
    rows = [[str(i), *(f"{row[name] * 100:.1f}" for name in METRICS)] for i, row in enumerate(scores.per_image())]
    means = scores.means()
    if len(rows) > 1:
        rows.append(["mean", *(f"{means[name] * 100:.1f}" for name in METRICS)])
    widths = [max(len(line[col]) for line in (header, *rows)) for col in range(len(header))]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in (header, *rows)]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines) + "\n(percent: cosine similarity x 100; higher is better)"

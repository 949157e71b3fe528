"""PLoRAScore: the paper's Table 1 metrics (Style Sim, CLIP Score, DINO Score) of generated images."""

from __future__ import annotations

import logging
import math

from ..glue import host
from ..glue.encoders import ENCODER_TYPE
from ..plora_core.image_preprocess import to_nchw
from ..plora_core.paper_metrics import LABELS, METRICS, format_table, paper_scores

logger = logging.getLogger("plora")

SCORES_UI_KEY = "plora_scores"  # per-image numbers in the node's ui output (scripts/evaluate.py reads them)


def check_finite_scores(scores) -> None:
    """Refuse NaN or infinite scores: they would go into the node's UI output, and NaN is not JSON (the
    server's /history would stop parsing in every browser)."""
    for index, row in enumerate(scores.per_image()):
        broken = [LABELS[name] for name, value in row.items() if not math.isfinite(value)]
        if broken:
            raise ValueError(
                f"PLoRAScore: image {index} scores NaN or infinite for {', '.join(broken)}: an encoder gave "
                "non-finite embeddings (e.g. it overflowed in fp16). Load the encoders with precision fp32, or "
                "check that the images and references hold finite values."
            )


class PLoRAScore:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images to score (a batch: each is scored on its own)."}),
                "subject_reference": ("IMAGE", {"tooltip": "The subject reference: e.g. a training image of the subject LoRA, or the subject LoRA's own render (Eq. 14). Several images: the similarities to each are averaged."}),
                "style_reference": ("IMAGE", {"tooltip": "The style reference: e.g. the style LoRA's training image, or the style LoRA's own render (Eq. 15). Several images: the similarities to each are averaged."}),
                "clip_encoder": (ENCODER_TYPE, {"tooltip": "A CLIP image encoder (Load P-LoRA CLIP Encoder; the paper's metrics use CLIP ViT-B/32): Style Sim and CLIP Score."}),
                "dino_encoder": (ENCODER_TYPE, {"tooltip": "A DINO image encoder (Load P-LoRA DINO Encoder, e.g. dino-vits16): DINO Score."}),
            }
        }

    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("table", "style_sim", "clip_score", "dino_score")
    OUTPUT_TOOLTIPS = (
        "The scores of every image and their mean, as a text table in percent (cosine x 100).",
        "Style Sim: mean CLIP image-image cosine similarity to the style reference (0-1; the paper prints x 100).",
        "CLIP Score: mean CLIP image-image cosine similarity to the subject reference (content preservation).",
        "DINO Score: mean DINO (CLS token) cosine similarity to the subject reference (content consistency).",
    )
    OUTPUT_NODE = True
    FUNCTION = "score"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "Scores images with the paper's metrics (Table 1): Style Sim (CLIP similarity to the style reference), "
        "CLIP Score (CLIP similarity to the subject reference) and DINO Score (DINO similarity to the subject "
        "reference). Shows the numbers on the node and outputs them as a table and as numbers."
    )

    def score(self, images, subject_reference, style_reference, clip_encoder, dino_encoder):
        scores = paper_scores(to_nchw(images), to_nchw(subject_reference), to_nchw(style_reference),
                              clip_encoder, dino_encoder, should_stop=host.stop_if_interrupted)
        check_finite_scores(scores)
        table = format_table(scores)
        means = scores.means()
        logger.info("P-LoRA scores:\n%s", table)
        return {"ui": {"text": [table], SCORES_UI_KEY: scores.per_image()},
                "result": (table, *(means[name] for name in METRICS))}

"""PLoRAComparisonGrid: a batch of images side by side with labels (the comparison workflow's picture)."""

from __future__ import annotations

from ..glue import host
from ..plora_core.image_grid import labelled_grid

DEFAULT_LABELS = "Direct merge\nPFK only (KL gate)\nPMK only (guidance)\nP-LoRA (PFK + PMK)"


class PLoRAComparisonGrid:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to compare, as one batch (e.g. joined with Batch Images)."}),
                "labels": ("STRING", {"default": DEFAULT_LABELS, "multiline": True, "tooltip": "One label per line, in the order of the batch; an empty text draws no labels."}),
                "columns": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Images per row; 0 puts them all in one row."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("One image: the batch in a grid, each image under its label.",)
    FUNCTION = "draw"
    CATEGORY = "P-LoRA"
    DESCRIPTION = "Joins a batch of images into one labelled grid, e.g. direct merge | PFK | PMK | P-LoRA side by side."

    def draw(self, images, labels, columns):
        lines = [line.strip() for line in labels.splitlines()] if labels.strip() else []
        return (labelled_grid(images, lines, columns, should_stop=host.stop_if_interrupted),)

"""PLoRASelectionMap: the gate's decisions of the last run as an image (paper Figure 5's view)."""

from __future__ import annotations

import logging

from ..glue.gate import gate_state_of, gated_layers
from ..plora_core.recorder import COND, UNCOND
from ..plora_core.selection_map import blank_map, recorded_images, selection_map

logger = logging.getLogger("plora")

_PASSES = {"positive (cond)": COND, "negative (uncond)": UNCOND}


class PLoRASelectionMap:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL from P-LoRA Model Patcher that the sampler used."}),
                "samples": ("LATENT", {"tooltip": "The sampler's output: connects this node after the sampling run it shows."}),
                "image_index": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Which image of the batch to show (0 = the first)."}),
                "cfg_pass": (list(_PASSES), {"tooltip": "CFG runs the model on the positive and the negative prompt; each decides separately."}),
                "cell_size": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Pixels per (step, layer) cell."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("selection_map",)
    OUTPUT_TOOLTIPS = ("Columns = steps, rows = gated layers; one colour per LoRA of the set (orange = subject, blue = "
                       "style, then green, red... for added LoRAs), with a legend naming the files.",)
    FUNCTION = "draw"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "Shows which LoRA the KL gate passed on at each gated layer and step of the last sampling run "
        "(orange = subject, blue = style, green, red... = LoRAs added with Add LoRA to Set, grey = not gated, "
        "e.g. outside the step window); the legend under the map names each colour's file."
    )

    def draw(self, model, samples, image_index, cfg_pass, cell_size):
        state = gate_state_of(model)
        if state is None:
            raise ValueError("This MODEL has no P-LoRA gate: connect the MODEL output of P-LoRA Model Patcher.")
        if cfg_pass not in _PASSES:
            raise ValueError(f"cfg_pass must be one of {list(_PASSES)}, not {cfg_pass!r}.")
        if not state.recorder.decisions:
            if state.sigma is None:
                raise ValueError("The gate has recorded nothing yet: this MODEL has not been sampled. Connect the "
                                 "sampler's LATENT output to 'samples' so this node runs after sampling with this MODEL.")
            return self._empty_window(model, state, cell_size)
        kind = _PASSES[cfg_pass]
        images = recorded_images(state.recorder, kind)
        if images == 0:
            raise ValueError(f"The last run has no {cfg_pass} pass to show (with cfg 1 ComfyUI skips the negative "
                             "prompt); pick the other cfg_pass.")
        if images is not None and image_index >= images:
            raise ValueError(f"image_index {image_index} is past the batch: the last run made {images} image(s), "
                             f"so image_index goes from 0 to {images - 1}.")
        return (selection_map(state.recorder, image_index, kind, cell_size),)

    @staticmethod
    def _empty_window(model, state, cell_size):
        """The sampler ran but no step fell inside the gate's window: an all-grey map and a note, no failure."""
        layers = len(gated_layers(model))
        steps = state.step + 1
        note = (f"The gate window (start_percent to end_percent of P-LoRA Model Patcher) held none of the last "
                f"run's {steps} step(s): the gate decided nothing and both LoRAs were merged directly. Widen the "
                "window to see the gate's decisions.")
        logger.warning("P-LoRA Selection Map: %s", note)
        return {"ui": {"text": [note]}, "result": (blank_map(layers, steps, cell_size),)}

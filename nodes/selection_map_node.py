"""PLoRASelectionMap: the gate's decisions of the last run as an image (paper Figure 5's view)."""

from __future__ import annotations

from ..plora_core.recorder import COND, UNCOND
from ..plora_core.selection_map import selection_map
from .gating import gate_state_of

_PASSES = {"positive (cond)": COND, "negative (uncond)": UNCOND}


class PLoRASelectionMap:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL from P-LoRA Model Patcher that the sampler used."}),
                "samples": ("LATENT", {"tooltip": "The sampler's output: connects this node after the sampling run it shows."}),
                "image_index": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Which image of the batch to show."}),
                "cfg_pass": (list(_PASSES), {"tooltip": "CFG runs the model on the positive and the negative prompt; each decides separately."}),
                "cell_size": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Pixels per (step, layer) cell."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("selection_map",)
    OUTPUT_TOOLTIPS = ("Columns = steps, rows = gated layers; orange = subject LoRA passed on, blue = style LoRA.",)
    FUNCTION = "draw"
    CATEGORY = "P-LoRA"
    DESCRIPTION = (
        "Shows which LoRA the KL gate passed on at each gated layer and step of the last sampling run "
        "(orange = subject, blue = style, grey = not gated, e.g. outside the step window)."
    )

    def draw(self, model, samples, image_index, cfg_pass, cell_size):
        state = gate_state_of(model)
        if state is None:
            raise ValueError("This MODEL has no P-LoRA gate: connect the MODEL output of P-LoRA Model Patcher.")
        if not state.recorder.decisions:
            raise ValueError("The gate has recorded nothing yet: connect the sampler's LATENT output to 'samples' "
                             "so this node runs after sampling with this MODEL.")
        return (selection_map(state.recorder, image_index, _PASSES[cfg_pass], cell_size),)

"""ComfyUI glue of the P-LoRA pack: node classes and their registration.

Registration also (1) wraps every node's FUNCTION with the numeric input checks of
`input_checks`, and (2) ties the pack's module caches (parsed LoRAs, loaded encoders) to
ComfyUI's memory management: they are emptied when ComfyUI unloads all models (`/free` with
`unload_models` or `free_memory`, an out-of-memory error, `--disable-smart-memory`) and when it
has to unload models to make room (`free_memory` unloaded something).
"""

import functools
import logging

from ..plora_core.encoders import release_encoders
from ..plora_core.lora_file import clear_lora_cache
from .comparison_grid_node import PLoRAComparisonGrid
from .encoder_nodes import (LoadPLoRACLIPEncoder, LoadPLoRADINOEncoder, PLoRAEncoderFromCLIPVision,
                            register_model_folders)
from .guidance_sampler import PosteriorMetricGuidanceSampler
from .input_checks import add_input_checks
from .load_pair import LoadSubjectStyleLoRA
from .patcher_node import PLoRAModelPatcher
from .routes import register_routes
from .selection_map_node import PLoRASelectionMap

logger = logging.getLogger("plora")

NODE_CLASS_MAPPINGS = {
    "LoadSubjectStyleLoRA": LoadSubjectStyleLoRA,
    "PLoRAModelPatcher": PLoRAModelPatcher,
    "PosteriorMetricGuidanceSampler": PosteriorMetricGuidanceSampler,
    "LoadPLoRACLIPEncoder": LoadPLoRACLIPEncoder,
    "LoadPLoRADINOEncoder": LoadPLoRADINOEncoder,
    "PLoRAEncoderFromCLIPVision": PLoRAEncoderFromCLIPVision,
    "PLoRASelectionMap": PLoRASelectionMap,
    "PLoRAComparisonGrid": PLoRAComparisonGrid,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadSubjectStyleLoRA": "Load Subject + Style LoRA (P-LoRA)",
    "PLoRAModelPatcher": "P-LoRA Model Patcher (KL gate)",
    "PosteriorMetricGuidanceSampler": "P-LoRA Metric Guidance Sampler (CLIP + DINO)",
    "LoadPLoRACLIPEncoder": "Load P-LoRA CLIP Encoder",
    "LoadPLoRADINOEncoder": "Load P-LoRA DINO Encoder",
    "PLoRAEncoderFromCLIPVision": "P-LoRA Encoder from CLIP Vision",
    "PLoRASelectionMap": "P-LoRA Selection Map",
    "PLoRAComparisonGrid": "P-LoRA Comparison Grid",
}


def release_caches(unload: bool = True) -> None:
    """Empty the pack's caches; with `unload`, also move live encoders off the accelerator."""
    clear_lora_cache()
    if unload:
        release_encoders()
    else:
        from ..plora_core.encoders import clear_encoder_cache

        clear_encoder_cache()


_CALLBACKS = "__plora_release_callbacks__"


def _run(callbacks, *args) -> None:
    for callback in list(callbacks):
        try:
            callback(*args)
        except Exception:  # a cache that fails to empty must not stop ComfyUI from freeing memory
            logger.exception("P-LoRA: releasing a cache failed")


def _wrap_unload_all_models(original, callbacks):
    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        _run(callbacks, True)
        return original(*args, **kwargs)
    return unload_all_models


def _wrap_free_memory(original, callbacks):
    @functools.wraps(original)
    def free_memory(*args, **kwargs):
        unloaded = original(*args, **kwargs)
        if unloaded:  # ComfyUI had to unload models to make room: give back what the caches hold
            _run(callbacks, False)
        return unloaded
    return free_memory


def install_memory_hooks() -> None:
    """Wrap comfy.model_management.unload_all_models and free_memory (module attributes: that is how
    ComfyUI's /free handling, its OOM handler and its loaders call them, in v0.3.x and later).

    Wrapped once per process; every copy of the pack that is imported adds its own release.
    """
    import comfy.model_management as mm

    for attribute, wrap in (("unload_all_models", _wrap_unload_all_models), ("free_memory", _wrap_free_memory)):
        current = getattr(mm, attribute)
        callbacks = getattr(current, _CALLBACKS, None)
        if callbacks is None:
            callbacks = []
            wrapper = wrap(current, callbacks)
            setattr(wrapper, _CALLBACKS, callbacks)
            setattr(mm, attribute, wrapper)
        if release_caches not in callbacks:
            callbacks.append(release_caches)


for _name, _node_class in NODE_CLASS_MAPPINGS.items():
    add_input_checks(_node_class, _name)
register_model_folders()
register_routes()
install_memory_hooks()

"""ComfyUI glue of the P-LoRA pack: node classes and their registration."""

from .load_pair import LoadSubjectStyleLoRA
from .patcher_node import PLoRAModelPatcher

NODE_CLASS_MAPPINGS = {
    "LoadSubjectStyleLoRA": LoadSubjectStyleLoRA,
    "PLoRAModelPatcher": PLoRAModelPatcher,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadSubjectStyleLoRA": "Load Subject + Style LoRA (P-LoRA)",
    "PLoRAModelPatcher": "P-LoRA Model Patcher (KL gate)",
}

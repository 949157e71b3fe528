"""ComfyUI glue of the P-LoRA pack: node classes and their registration."""

from .encoder_nodes import (LoadPLoRACLIPEncoder, LoadPLoRADINOEncoder, PLoRAEncoderFromCLIPVision,
                            register_model_folders)
from .guidance_sampler import PosteriorMetricGuidanceSampler
from .load_pair import LoadSubjectStyleLoRA
from .patcher_node import PLoRAModelPatcher
from .routes import register_routes
from .selection_map_node import PLoRASelectionMap

register_model_folders()
register_routes()

NODE_CLASS_MAPPINGS = {
    "LoadSubjectStyleLoRA": LoadSubjectStyleLoRA,
    "PLoRAModelPatcher": PLoRAModelPatcher,
    "PosteriorMetricGuidanceSampler": PosteriorMetricGuidanceSampler,
    "LoadPLoRACLIPEncoder": LoadPLoRACLIPEncoder,
    "LoadPLoRADINOEncoder": LoadPLoRADINOEncoder,
    "PLoRAEncoderFromCLIPVision": PLoRAEncoderFromCLIPVision,
    "PLoRASelectionMap": PLoRASelectionMap,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadSubjectStyleLoRA": "Load Subject + Style LoRA (P-LoRA)",
    "PLoRAModelPatcher": "P-LoRA Model Patcher (KL gate)",
    "PosteriorMetricGuidanceSampler": "P-LoRA Metric Guidance Sampler (CLIP + DINO)",
    "LoadPLoRACLIPEncoder": "Load P-LoRA CLIP Encoder",
    "LoadPLoRADINOEncoder": "Load P-LoRA DINO Encoder",
    "PLoRAEncoderFromCLIPVision": "P-LoRA Encoder from CLIP Vision",
    "PLoRASelectionMap": "P-LoRA Selection Map",
}

"""The P-LoRA pack's ComfyUI nodes: one node class (or one family) per module, and their registration.

Every module here is `<what>_node.py` (or `<what>_nodes.py` for a family) and holds node classes only;
what installs the core into ComfyUI is in `glue/`. Registration also wraps every node's FUNCTION with
the numeric input checks of `glue/input_checks.py`, and ties the pack's caches to ComfyUI's memory
management (`glue/memory_hooks.py`).
"""

from ..glue.encoders import register_model_folders
from ..glue.input_checks import add_input_checks
from ..glue.memory_hooks import install_memory_hooks, release_caches  # noqa: F401  (release_caches: for tools/tests)
from ..glue.routes import register_routes
from .add_lora_node import AddLoRAToSet
from .comparison_grid_node import PLoRAComparisonGrid
from .encoder_nodes import LoadPLoRACLIPEncoder, LoadPLoRADINOEncoder, PLoRAEncoderFromCLIPVision
from .guidance_model_node import PLoRAMetricGuidance
from .guidance_sampler_node import PosteriorMetricGuidanceSampler
from .load_pair_node import LoadSubjectStyleLoRA
from .patcher_node import PLoRAModelPatcher
from .reference_node import PLoRAReference
from .score_node import PLoRAScore
from .selection_map_node import PLoRASelectionMap

NODE_CLASS_MAPPINGS = {
    "LoadSubjectStyleLoRA": LoadSubjectStyleLoRA,
    "AddLoRAToSet": AddLoRAToSet,
    "PLoRAModelPatcher": PLoRAModelPatcher,
    "PosteriorMetricGuidanceSampler": PosteriorMetricGuidanceSampler,
    "PLoRAMetricGuidance": PLoRAMetricGuidance,
    "LoadPLoRACLIPEncoder": LoadPLoRACLIPEncoder,
    "LoadPLoRADINOEncoder": LoadPLoRADINOEncoder,
    "PLoRAEncoderFromCLIPVision": PLoRAEncoderFromCLIPVision,
    "PLoRASelectionMap": PLoRASelectionMap,
    "PLoRAComparisonGrid": PLoRAComparisonGrid,
    "PLoRAScore": PLoRAScore,
    "PLoRAReference": PLoRAReference,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadSubjectStyleLoRA": "Load Subject + Style LoRA (P-LoRA)",
    "AddLoRAToSet": "Add LoRA to Set (P-LoRA)",
    "PLoRAModelPatcher": "P-LoRA Model Patcher (KL gate)",
    "PosteriorMetricGuidanceSampler": "P-LoRA Metric Guidance Sampler (CLIP + DINO)",
    "PLoRAMetricGuidance": "P-LoRA Metric Guidance (guided MODEL)",
    "LoadPLoRACLIPEncoder": "Load P-LoRA CLIP Encoder",
    "LoadPLoRADINOEncoder": "Load P-LoRA DINO Encoder",
    "PLoRAEncoderFromCLIPVision": "P-LoRA Encoder from CLIP Vision",
    "PLoRASelectionMap": "P-LoRA Selection Map",
    "PLoRAComparisonGrid": "P-LoRA Comparison Grid",
    "PLoRAScore": "P-LoRA Score (Style Sim, CLIP, DINO)",
    "PLoRAReference": "P-LoRA Reference",
}


for _name, _node_class in NODE_CLASS_MAPPINGS.items():
    add_input_checks(_node_class, _name)
register_model_folders()
register_routes()
install_memory_hooks()

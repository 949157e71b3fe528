"""Loader nodes for the guidance encoders: CLIP (open_clip checkpoints) and DINO (HF folders).

Models come from ComfyUI's model folders: `models/open_clip/` for CLIP checkpoint files and
`models/dino/<folder>/` for DINO model folders (registered in `glue/encoders.py`). Nothing is downloaded.
"""

from __future__ import annotations

from ..glue import host
from ..glue.encoders import (CLIP_FOLDER, DINO_FOLDER, ENCODER_TYPE, PRECISIONS, clip_architectures,
                             device_and_dtype, encoder_from_clip_vision, register_custom_architectures)
from ..plora_core.encoders import load_dino_encoder, load_open_clip_encoder


class LoadPLoRACLIPEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": ([f for f in host.model_file_list(CLIP_FOLDER) if not f.lower().endswith(".json")], {"tooltip": "An open_clip or OpenAI CLIP checkpoint file in models/open_clip (.safetensors, .bin or OpenAI .pt)."}),
                "architecture": (clip_architectures(), {"tooltip": "The open_clip architecture the checkpoint is for (ViT-B-32 is what the paper's metrics use)."}),
                "precision": (PRECISIONS, {"tooltip": "auto: fp16 on a GPU, fp32 on the CPU. Scores are computed in float32 either way."}),
            }
        }

    FILE_INPUTS = ("checkpoint",)  # a name in models/open_clip: found (or refused) by the loader
    RETURN_TYPES = (ENCODER_TYPE,)
    RETURN_NAMES = ("clip_encoder",)
    OUTPUT_TOOLTIPS = ("A differentiable CLIP image encoder for the PosteriorMetricGuidanceSampler.",)
    FUNCTION = "load"
    CATEGORY = "P-LoRA"
    DESCRIPTION = ("Loads a CLIP image encoder (open_clip) from a local checkpoint for P-LoRA score guidance (Eq. 16-17). "
                   "Custom open_clip architectures: put their <Name>.json config in models/open_clip.")

    def load(self, checkpoint, architecture, precision):
        path = host.resolve_model_file(CLIP_FOLDER, checkpoint)
        register_custom_architectures()
        device, dtype = device_and_dtype(precision)
        return (load_open_clip_encoder(architecture, path, device, dtype,
                                       label=host.model_label(CLIP_FOLDER, checkpoint)),)


class LoadPLoRADINOEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_folder": (host.model_dir_list(DINO_FOLDER), {"tooltip": "A DINO (v1 ViT, e.g. dino-vits16) or DINOv2 model folder in models/dino, in Hugging Face format."}),
                "precision": (PRECISIONS, {"tooltip": "auto: fp16 on a GPU, fp32 on the CPU. Scores are computed in float32 either way."}),
            }
        }

    FILE_INPUTS = ("model_folder",)  # a folder in models/dino: found (or refused) by the loader
    RETURN_TYPES = (ENCODER_TYPE,)
    RETURN_NAMES = ("dino_encoder",)
    OUTPUT_TOOLTIPS = ("A differentiable DINO image encoder for the PosteriorMetricGuidanceSampler.",)
    FUNCTION = "load"
    CATEGORY = "P-LoRA"
    DESCRIPTION = "Loads a DINO image encoder (transformers, local folder) for P-LoRA score guidance (Eq. 18)."

    def load(self, model_folder, precision):
        path = host.resolve_model_dir(DINO_FOLDER, model_folder)
        device, dtype = device_and_dtype(precision)
        return (load_dino_encoder(path, device, dtype, label=host.model_label(DINO_FOLDER, model_folder)),)



class PLoRAEncoderFromCLIPVision:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision": ("CLIP_VISION", {"tooltip": "A model from Load CLIP Vision (e.g. the CLIP ViT-H/G you use for IPAdapter, or DINOv2)."})}}

    RETURN_TYPES = (ENCODER_TYPE,)
    RETURN_NAMES = ("encoder",)
    OUTPUT_TOOLTIPS = ("A differentiable image encoder for the PosteriorMetricGuidanceSampler (clip_encoder or dino_encoder).",)
    FUNCTION = "wrap"
    CATEGORY = "P-LoRA"
    DESCRIPTION = "Uses a CLIP_VISION model you already have (CLIP ViT-L/H/G, DINOv2) as a P-LoRA guidance encoder."

    def wrap(self, clip_vision):
        return (encoder_from_clip_vision(clip_vision),)

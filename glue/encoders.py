"""The guidance encoders' glue: their model folders, precision, and CLIP_VISION models as encoders.

Models come from ComfyUI's model folders: `models/open_clip/` for CLIP checkpoint files and
`models/dino/<folder>/` for DINO model folders (registered by `register_model_folders`). open_clip
configs placed in models/open_clip become architectures. Nothing is downloaded. The loader nodes
are in `nodes/encoder_nodes.py`; the encoders themselves in `plora_core/encoders.py`.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from ..plora_core.encoders import ImageEncoder
from ..plora_core.files import regular_file_stat, scrub, shown_name
from . import host
from .input_checks import register_object_type
from .memory_hooks import register_cache
from .trainable_copy import copy_tensors_as_saved, frozen_normal_copy

logger = logging.getLogger("plora")

ENCODER_TYPE = "PLORA_ENCODER"
CLIP_FOLDER = "open_clip"
DINO_FOLDER = "dino"
register_object_type(ENCODER_TYPE, ImageEncoder, "Load P-LoRA CLIP Encoder, Load P-LoRA DINO Encoder or "
                     "P-LoRA Encoder from CLIP Vision")
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DEFAULT_ARCHITECTURES = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-H-14", "ViT-bigG-14"]


def register_model_folders() -> None:
    """models/open_clip and models/dino as ComfyUI model folders."""
    for name in (CLIP_FOLDER, DINO_FOLDER):
        host.register_model_folder_kind(name)


def device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype]:
    """ComfyUI's compute device; fp16 on a GPU that supports it under 'auto', float32 on the CPU."""
    device, fp16 = host.compute_device_and_fp16()
    if precision == "auto":
        dtype = torch.float16 if fp16 else torch.float32
    elif precision in _DTYPES:
        dtype = _DTYPES[precision]
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}.")
    return device, dtype


_CONFIG_LIMIT = 1 << 20  # an open_clip model config is a few hundred bytes
_not_configs: set[tuple] = set()  # (path, mtime, size) of .json files that are not open_clip configs
register_cache(_not_configs.clear)  # emptied with the pack's other caches (memory_hooks)


def _is_open_clip_config(path: str) -> bool:
    """A small regular .json file holding an open_clip model config (embed_dim, vision_cfg)."""
    info = regular_file_stat(path)
    key = (path, info.st_mtime_ns, info.st_size) if info else None
    if key is None or key in _not_configs or info.st_size > _CONFIG_LIMIT:
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: bad JSON or not UTF-8
        name = shown_name(os.path.basename(path))
        logger.debug("models/open_clip: %s is not a JSON model config (%s)", name, scrub(str(error), path, name))
        config = None
    if isinstance(config, dict) and "embed_dim" in config and isinstance(config.get("vision_cfg"), dict):
        return True
    _not_configs.add(key)
    return False


def register_custom_architectures() -> None:
    """open_clip model configs (`<Name>.json`) placed in models/open_clip become architectures.

    Other .json files there (a Hugging Face config, a broken file) are skipped: open_clip re-reads every
    registered config whenever one is added, so one bad file would break every later registration.
    """
    import open_clip

    known = set(open_clip.list_models())
    for name in host.model_file_list(CLIP_FOLDER):
        architecture = os.path.splitext(os.path.basename(name))[0]
        if not name.lower().endswith(".json") or architecture in known:
            continue
        try:
            path = host.resolve_model_file(CLIP_FOLDER, name)  # regular files inside the folder only
        except FileNotFoundError:
            continue
        if _is_open_clip_config(path):
            open_clip.add_model_config(path)
            known.add(architecture)


def clip_architectures() -> list[str]:
    try:
        import open_clip
    except ImportError:
        return _DEFAULT_ARCHITECTURES
    register_custom_architectures()
    names = open_clip.list_models()
    return [n for n in _DEFAULT_ARCHITECTURES if n in names] + [n for n in names if n not in _DEFAULT_ARCHITECTURES]



class ClipVisionImageEncoder(ImageEncoder):
    """A ComfyUI CLIP_VISION model (CLIP ViT-L/H/G, or DINOv2 in ComfyUI 0.3+) as a guidance encoder.

    Uses a normal-tensor copy of the model and its projected image embedding (`image_embeds`),
    with the pack's differentiable preprocessing (ComfyUI's own rounds pixels: zero gradient).
    """

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        with copy_tensors_as_saved():  # ComfyUI's CLIP vision adds residuals in place
            return self.model(pixel_values=pixels, intermediate_output=-2)[2]  # [B, D]


def encoder_from_clip_vision(clip_vision) -> ClipVisionImageEncoder:
    device = clip_vision.load_device
    dtype = next(clip_vision.model.parameters()).dtype
    return ClipVisionImageEncoder(
        frozen_normal_copy(clip_vision.model, device), name=f"CLIP_VISION {type(clip_vision.model).__name__}",
        image_size=clip_vision.image_size, mean=clip_vision.image_mean, std=clip_vision.image_std,
        device=device, dtype=dtype,
    )


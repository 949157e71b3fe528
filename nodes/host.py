"""The few ComfyUI calls the pack makes, written once for both host generations.

The 2024 core and ComfyUI v0.3.x differ in what `comfy.lora.load_lora` returns (tuples
vs `weight_adapter` objects) and in whether `comfy.lora_convert.convert_lora` exists.
Everything that depends on that lives here.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.lora
import comfy.sd
import comfy.utils

logger = logging.getLogger("plora")

try:
    import comfy.lora_convert as _lora_convert
except ImportError:  # 2024 core
    _lora_convert = None

# model_config class name fragments -> the family names plora_core.lora_info uses
_MODEL_FAMILIES = (("Flux", "Flux"), ("SD3", "SD3"), ("SDXL", "SDXL"), ("SSD1B", "SDXL"), ("Segmind", "SDXL"),
                   ("SD2", "SD2"), ("SD15", "SD1.5"))


def model_family(model_patcher) -> str:
    """Family of a loaded MODEL ('SDXL', 'Flux', ...), from ComfyUI's detected config."""
    name = type(model_patcher.model.model_config).__name__
    for fragment, family in _MODEL_FAMILIES:
        if fragment in name:
            return family
    return name


def unet_key_map(model_patcher) -> dict:
    """LoRA key prefix -> model weight key (or (key, offset[, fn]) for fused layers).

    ComfyUI's own map, plus the plain diffusers/peft UNet names (`unet.<block>.attn1.to_q`)
    that current diffusers and peft trainers write and ComfyUI maps only with `.processor.`.
    """
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    unet_config = model_patcher.model.model_config.unet_config
    if "num_res_blocks" in unet_config:
        for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
            if diffusers_key.endswith(".weight"):
                name = diffusers_key[: -len(".weight")]
                for prefix in ("unet.", "base_model.model."):
                    key_map.setdefault(prefix + name, f"diffusion_model.{ldm_key}")
    return key_map


def clip_key_map(clip) -> dict:
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


def convert_lora(tensors: dict) -> dict:
    """ComfyUI's own format conversions (v0.3.x), identity on the 2024 core."""
    return _lora_convert.convert_lora(tensors) if _lora_convert is not None else tensors


def load_lora_patches(tensors: dict, key_map: dict) -> dict:
    """comfy.lora.load_lora: {target: patch}, target a weight key or (key, offset[, fn])."""
    return comfy.lora.load_lora(tensors, key_map)


def lora_factors(patch):
    """(up, down, alpha, mid) for a plain LoRA/LoCon patch of either host, else None.

    DoRA (dora_scale) and reshaping patches have no cheap factored form: None, so the
    caller takes the dense path.
    """
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    elif getattr(patch, "name", None) == "lora" and hasattr(patch, "weights"):
        weights = patch.weights
    else:
        return None
    up, down, alpha, mid, dora_scale, reshape = weights[:6]
    if dora_scale is not None or reshape is not None:
        return None
    return up, down, alpha, mid


def dense_delta(patch, strength: float, base: torch.Tensor, key: str, offset=None, function=None) -> torch.Tensor:
    """W(patched) - W0 in float32 on the CPU, computed by ComfyUI's own calculate_weight.

    Used for adapters with no factored form (LoHa, LoKr, DoRA, GLoRA, full diffs) and bias
    diffs, so every adapter ComfyUI reads is also read here.
    """
    w0 = base.detach().to(device="cpu", dtype=torch.float32, copy=True)
    patched = comfy.lora.calculate_weight([(strength, patch, 1.0, offset, function)], w0.clone(), key)
    return patched.float() - w0


def apply_lora_to_clip(clip, tensors: dict, strength: float):
    """The text-encoder half of a LoRA on a CLIP clone, exactly as LoraLoader applies it."""
    return comfy.sd.load_lora_for_models(None, clip, tensors, 0.0, strength)[1]


def get_module(model_patcher, path: str) -> torch.nn.Module:
    return comfy.utils.get_attr(model_patcher.model, path)


def resolve_lora_path(name: str) -> str:
    """A name from ComfyUI's loras list (or an absolute path, for API use) -> a file path."""
    if os.path.isabs(name):
        return name
    try:
        import folder_paths
    except ImportError:
        raise FileNotFoundError(
            f"LoRA '{name}' is not an absolute path and ComfyUI's folder_paths is not available."
        ) from None
    return folder_paths.get_full_path_or_raise("loras", name)


def lora_file_list() -> list[str]:
    """ComfyUI's list of files in models/loras (empty outside a full ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list("loras")

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


def unpatched_parameter(model_patcher, key: str, current: torch.Tensor) -> torch.Tensor:
    """A parameter as the checkpoint has it, without another clone's merged LoRA patches.

    Clones share the model: after a sampler ran a LoraLoader clone, its patches stay applied in
    place until ComfyUI unloads it, and the originals wait in the backup the clones share.
    """
    saved = model_patcher.backup.get(key)
    return current if saved is None else saved.weight


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


def ksampler_inputs() -> dict:
    """KSampler's own inputs, so the guided sampler takes the same wiring and widget values."""
    import comfy.samplers

    return {
        "model": ("MODEL", {"tooltip": "The model used for denoising the input latent (e.g. from PLoRAModelPatcher)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                         "tooltip": "The random seed used for creating the noise."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "The number of denoising steps."}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale, as in KSampler."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm, as in KSampler."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule, as in KSampler."}),
        "positive": ("CONDITIONING", {"tooltip": "The conditioning describing what to include in the image."}),
        "negative": ("CONDITIONING", {"tooltip": "The conditioning describing what to exclude from the image."}),
        "latent_image": ("LATENT", {"tooltip": "The latent image to denoise (a noise mask on it is honoured)."}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "The amount of denoising applied; below 1 keeps part of the input latent."}),
    }


def schedule_sigmas(model_patcher, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigma schedule KSampler will use for these settings."""
    import comfy.samplers

    return comfy.samplers.KSampler(model_patcher, steps=steps, device=model_patcher.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=denoise,
                                   model_options=model_patcher.model_options).sigmas.cpu()


def is_flow_model(model_patcher) -> bool:
    """Rectified-flow sampling (Flux, SD3): x = sigma * n + (1 - sigma) * x0."""
    import comfy.model_sampling

    return isinstance(model_patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def run_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise) -> dict:
    """KSampler's own path (noise, noise mask, preview, progress) via nodes.common_ksampler.

    The 2024 core has no nodes.py: the same calls are made here, without the preview.
    """
    import sys

    import comfy.sample

    host_nodes = sys.modules.get("nodes")
    if host_nodes is not None and hasattr(host_nodes, "common_ksampler"):
        return host_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, denoise=denoise)[0]
    latent = latent_image["samples"]
    if hasattr(comfy.sample, "fix_empty_latent_channels"):
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=denoise, noise_mask=latent_image.get("noise_mask"), seed=seed)
    out = latent_image.copy()
    out["samples"] = samples
    return out

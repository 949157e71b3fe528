"""The few ComfyUI calls the pack makes: the only module of the pack that imports ComfyUI.

The pack needs ComfyUI v0.3.64 or newer (pyproject's `requires-comfyui`): run-time wrappers
(`comfy.patcher_extension`), `weight_adapter` patches from `comfy.lora.load_lora`, and
`comfy.lora_convert`. Anything that differs between ComfyUI versions is settled here.
"""

from __future__ import annotations

import logging
import os
import stat

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths

from ..plora_core.files import regular_file_stat, shown_name

logger = logging.getLogger("plora")


def add_model_call_wrapper(model_patcher, key: str, wrapper) -> None:
    """Wrap every call of the diffusion model (`BaseModel.apply_model`, every model family) on this clone.

    `wrapper(executor, x, sigma, c_concat, c_crossattn, control, transformer_options, **kwargs)`
    gets in `executor.class_obj` the model instance that actually runs (ComfyUI may run a deep
    copy: multi-GPU, hooked conditioning), so per-layer behaviour installed from there never goes
    stale.
    """
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)


def model_call_wrappers(model_patcher, key: str) -> list:
    """The wrappers `add_model_call_wrapper` added under `key`."""
    return list(model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key))

# ComfyUI's model_config classes (comfy/supported_models.py) -> the family names plora_core.lora_info uses.
# A subclass (FluxSchnell, ChromaRadiance, WAN22_T2V, SSD1B, ...) takes its nearest listed class's family;
# newer architectures that may subclass an older one (Flux2, QwenImage21, HiDreamO1) are listed by name.
_MODEL_FAMILIES = (("Flux", "Flux"), ("Flux2", "Flux.2"), ("Chroma", "Chroma"), ("SD3", "SD3.5"),
                   ("QwenImage", "Qwen-Image"), ("QwenImage21", "Qwen-Image 2.1"), ("HiDream", "HiDream"),
                   ("HiDreamO1", "HiDream-O1"), ("WAN21_T2V", "Wan"), ("SDXL", "SDXL"), ("SDXLRefiner", "SDXL"),
                   ("SD20", "SD2"), ("SD15", "SD1.5"))


def model_family(model_patcher) -> str:
    """Family of a loaded MODEL ('SDXL', 'Flux', 'Wan 14B', ...), from ComfyUI's detected config; sized
    families (SD3.5, Wan) by the config's hidden width. An unlisted class gives its own name."""
    from ..plora_core.lora_info import sd3_family, wan_family

    config = model_patcher.model.model_config
    families = dict(_MODEL_FAMILIES)
    for cls in type(config).__mro__:
        family = families.get(cls.__name__)
        if family == "SD3.5":
            depth = config.unet_config.get("depth")  # MMDiT: hidden width = 64 x depth
            return sd3_family(64 * depth if depth else None)
        if family == "Wan":
            return wan_family(config.unet_config.get("dim"))
        if family is not None:
            return family
    return type(config).__name__


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
    """ComfyUI's own LoRA format conversions (comfy.lora_convert)."""
    return comfy.lora_convert.convert_lora(tensors)


def load_lora_patches(tensors: dict, key_map: dict) -> dict:
    """comfy.lora.load_lora: {target: patch}, target a weight key or (key, offset[, fn])."""
    return comfy.lora.load_lora(tensors, key_map)


def lora_factors(patch):
    """(up, down, alpha, mid) for a plain LoRA/LoCon patch (ComfyUI's `LoRAAdapter`), else None.

    DoRA (dora_scale) and reshaping patches have no cheap factored form: None, so the
    caller takes the dense path.
    """
    if getattr(patch, "name", None) != "lora" or not hasattr(patch, "weights"):
        return None
    weights = patch.weights
    up, down, alpha, mid, dora_scale, reshape = weights[:6]
    if dora_scale is not None or reshape is not None:
        return None
    return up, down, alpha, mid


def is_quantized(tensor: torch.Tensor) -> bool:
    """A quantized weight (comfy-kitchen's QuantizedTensor: fp8 mixed, nvfp4, mxfp8, int8; GGUF's
    GGMLTensor): a tensor subclass that stays quantized under `.to(float32)` and `clone()`."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return type(tensor) not in plain and callable(getattr(type(tensor), "dequantize", None))


def dequantized(tensor: torch.Tensor) -> torch.Tensor:
    """A plain float32 CPU copy of a weight, dequantized explicitly when it is quantized.

    Arithmetic on a quantized weight works on a temporary dequantized copy and leaves the
    weight as it was, so a patch added onto it would silently add nothing.
    """
    if is_quantized(tensor):
        tensor = tensor.dequantize()
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)


def dense_delta(patch, strength: float, base: torch.Tensor, key: str, offset=None, function=None) -> torch.Tensor:
    """W(patched) - W0 in float32 on the CPU, computed by ComfyUI's own calculate_weight.

    Used for adapters with no factored form (LoHa, LoKr, DoRA, GLoRA, full diffs) and bias
    diffs, so every adapter ComfyUI reads is also read here. A quantized W0 is dequantized once,
    here, when the node runs (never per model call).
    """
    w0 = dequantized(base)
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


def get_attr(obj, path: str):
    """`obj.a.b.c` for path 'a.b.c' (ComfyUI's own lookup, also through ModuleList indices)."""
    return comfy.utils.get_attr(obj, path)


# ---------------------------------------------------------------- model files
#
# Every file the pack opens is named by the user as a name inside one of ComfyUI's model folders
# (`loras`, `open_clip`, `dino`) and found exactly as ComfyUI's own loaders find it: through
# `folder_paths` (which also turns `..` and absolute names into names inside the folder). A name
# that is not a regular file inside those folders gets the core loaders' error, naming the folder
# and the name as given, whatever exists elsewhere on the server.


def add_model_folder(kind: str, folder: str) -> None:
    """Make `folder` one of the `kind` model folders ('loras', 'open_clip', 'dino').

    This is folder_paths.add_model_folder_path (what extra_model_paths.yaml does). Tests register
    their temporary folders here.
    """
    folder_paths.add_model_folder_path(kind, os.path.abspath(folder))


def register_model_folder_kind(kind: str) -> None:
    """models/<kind> as a model folder kind ('open_clip', 'dino'), unless ComfyUI or extra_model_paths.yaml
    already defines it."""
    if kind not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))


def compute_device_and_fp16() -> tuple[torch.device, bool]:
    """ComfyUI's compute device, and whether ComfyUI would run fp16 on it."""
    device = comfy.model_management.get_torch_device()
    return device, device.type != "cpu" and bool(comfy.model_management.should_use_fp16(device))


def prompt_server_routes():
    """The running ComfyUI server's aiohttp route table, or None outside a server (tests, tools)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    instance = getattr(PromptServer, "instance", None)
    return None if instance is None else instance.routes


def model_folders(kind: str) -> list[str]:
    """The folders of one kind, in ComfyUI's search order."""
    kind = folder_paths.map_legacy(kind)
    return folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []


def _not_found(kind: str, name: str) -> FileNotFoundError:
    return FileNotFoundError(f"Model in folder '{kind}' with filename '{shown_name(name)}' not found.")


def model_label(kind: str, name: str) -> str:
    """The name messages and logs use for a model file: `model_name`, with the bytes of a name that is not
    valid UTF-8 escaped (plora_core.files.shown_name)."""
    return shown_name(model_name(kind, name))


def model_name(kind: str, name: str) -> str:
    """`name` relative to its model folder. An absolute path that lies inside one of the `kind`
    folders becomes the name it has there (lexically, without touching the disk); any other name
    is returned unchanged (and then resolved inside the folders, as ComfyUI does)."""
    if not isinstance(name, str):
        raise _not_found(kind, str(name))
    if os.path.isabs(name):
        target = os.path.normpath(name)
        for base in model_folders(kind):
            base = os.path.normpath(os.path.abspath(base))
            if target.startswith(base + os.sep):
                return os.path.relpath(target, base)
    return name


def _inside_folders(kind: str, name: str):
    """Candidate paths of `name` in each `kind` folder: ComfyUI's normalisation, which keeps
    absolute names and `..` inside the folder."""
    relative = os.path.relpath(os.path.join("/", name), "/")
    if relative in (".", ""):
        return
    for base in model_folders(kind):
        yield os.path.join(base, relative)


def resolve_model_file(kind: str, name: str) -> str:
    """The regular file `name` in the `kind` model folders, as ComfyUI's loaders find it."""
    relative = model_name(kind, name)
    if "\0" in relative:
        raise _not_found(kind, name)
    path = folder_paths.get_full_path(kind, relative)
    if path is None or regular_file_stat(path) is None:  # isfile follows links; a FIFO or device is refused
        raise _not_found(kind, name)
    return path


def resolve_model_dir(kind: str, name: str) -> str:
    """The folder `name` (e.g. a Hugging Face model folder) in the `kind` model folders."""
    relative = model_name(kind, name)
    if "\0" not in relative:
        for path in _inside_folders(kind, relative):
            try:
                if stat.S_ISDIR(os.stat(path).st_mode):
                    return path
            except OSError:
                continue
    raise _not_found(kind, name)


def model_file_list(kind: str) -> list[str]:
    """Names of the files in the `kind` folders, as ComfyUI lists them (relative, sorted)."""
    return folder_paths.get_filename_list(kind) if model_folders(kind) else []


def model_dir_list(kind: str) -> list[str]:
    """Names of the model folders (holding a regular config.json) directly inside the `kind` folders."""
    found = set()
    for base in model_folders(kind):
        if os.path.isdir(base):
            found.update(d for d in os.listdir(base) if regular_file_stat(os.path.join(base, d, "config.json")))
    return sorted(found)


def resolve_lora_path(name: str) -> str:
    """A name from ComfyUI's loras list -> the file's path (only inside models/loras)."""
    return resolve_model_file("loras", name)


def lora_file_list() -> list[str]:
    """ComfyUI's list of files in models/loras."""
    return model_file_list("loras")


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


def cfg_function(model, cond_pred, uncond_pred, scale, x, sigma, model_options, cond, uncond):
    """ComfyUI's own CFG combination (with the model's sampler_cfg_function and post-CFG functions)."""
    import comfy.samplers

    return comfy.samplers.cfg_function(model, cond_pred, uncond_pred, scale, x, sigma, model_options=model_options,
                                       cond=cond, uncond=uncond)


def calc_cond_batch(model, conds, x, sigma, model_options):
    """ComfyUI's own batched model call over cond and uncond (what sampling_function runs)."""
    import comfy.samplers

    return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)


def model_management():
    """comfy.model_management itself: the memory hooks wrap its module attributes."""
    import comfy.model_management

    return comfy.model_management


def run_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise) -> dict:
    """KSampler's own path (noise, noise mask, preview, progress) via nodes.common_ksampler.

    Outside a running server (the host tests) ComfyUI's nodes.py is not imported: the same calls
    are made here, without the preview.
    """
    import sys

    import comfy.sample

    host_nodes = sys.modules.get("nodes")
    if host_nodes is not None and hasattr(host_nodes, "common_ksampler"):
        return host_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, denoise=denoise)[0]
    latent = latent_image["samples"]
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=denoise, noise_mask=latent_image.get("noise_mask"), seed=seed)
    out = latent_image.copy()
    out["samples"] = samples
    return out


# ---------------------------------------------------------------- sampler-level wrappers (guidance)

def add_outer_sample_wrapper(model_patcher, key: str, wrapper) -> None:
    """Wrap every sampling run of this clone (`CFGGuider.outer_sample`, whichever node samples it).

    `wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs)` gets the guider in
    `executor.class_obj`, the KSAMPLER and the run's sigmas.
    """
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, wrapper)


# ---------------------------------------------------------------- interruption

def stop_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (/interrupt); the pack's
    long loops in plora_core take it as their `should_stop` callback."""
    comfy.model_management.throw_exception_if_processing_interrupted()

"""Tiny SD3.5, Qwen-Image, HiDream, Chroma and Wan models built by ComfyUI's own classes, and LoRA files
in the formats their trainers write.

Each model is the family's real `comfy.supported_models` config and `comfy.model_base` class (so the
real key map, conversions and forward run) with a reduced `unet_config`: few blocks, a narrow width,
random weights, on the CPU. These classes exist from ComfyUI v0.3.3x on (HiDream, Chroma, Qwen-Image
and Wan 2.2 from 2025); `missing_family_classes()` says which this host lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from support.host_support import _patcher, _randomise
from safetensors.torch import save_file

FAMILY_CLASSES = {
    "SD3.5": ("SD3", "SD3"),
    "Chroma": ("Chroma", "Chroma"),
    "Qwen-Image": ("QwenImage", "QwenImage"),
    "HiDream": ("HiDream", "HiDream"),
    "Wan 2.1": ("WAN21_T2V", "WAN21"),
    "Wan 2.2": ("WAN22_T2V", "WAN22"),
}


def missing_family_classes() -> list[str]:
    """`supported_models`/`model_base` classes these tests need that the installed ComfyUI lacks."""
    import comfy.model_base
    import comfy.supported_models

    missing = []
    for config, base in FAMILY_CLASSES.values():
        if not hasattr(comfy.supported_models, config):
            missing.append(f"comfy.supported_models.{config}")
        if not hasattr(comfy.model_base, base):
            missing.append(f"comfy.model_base.{base}")
    return missing


def _build(config_name: str, unet_config: dict, seed: int):
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    model = config.get_model({})
    _randomise(model, seed)
    return _patcher(model)


# ------------------------------------------------------------------ models
# Widths: real models are 1536-5120 wide; these keep each family's layer layout (fused qkv, MoE,
# separate q/k/v, text stream) with hidden widths of 64-128 so a sampling run takes a second.

SD3_HIDDEN = 128  # MMDiT: hidden = 64 * depth
SD3_UNET = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 32, "out_features": SD3_HIDDEN}},
                num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None, x_block_self_attn_layers=[0],
                qk_norm="rms")
CHROMA_HIDDEN = 64
CHROMA_UNET = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=CHROMA_HIDDEN,
                   mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                   patch_size=2, qkv_bias=True, in_dim=64, out_dim=CHROMA_HIDDEN, hidden_dim=64, n_layers=1)
QWEN_HIDDEN = 64
QWEN_UNET = dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
HIDREAM_HIDDEN = 64
HIDREAM_UNET = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                    num_single_layers=1, attention_head_dim=32, num_attention_heads=2, caption_channels=[24, 40],
                    text_emb_dim=32, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[16, 8, 8],
                    max_resolution=[16, 16], llama_layers=[0, 1])
HIDREAM_LLAMA_LAYERS = 2
WAN_HIDDEN = 64
WAN_UNET = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=WAN_HIDDEN,
                ffn_dim=128, freq_dim=32, text_dim=40, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN22_UNET = dict(WAN_UNET, in_dim=48, out_dim=48)


def tiny_sd35(seed: int = 0):
    """MMDiT (SD3/SD3.5): joint blocks with fused qkv; block 0 has SD3.5 Medium's second attention (attn2)."""
    model_patcher = _build("SD3", SD3_UNET, seed)
    pos_embed = model_patcher.model.diffusion_model.pos_embed  # a buffer ComfyUI leaves uninitialised (torch.empty)
    pos_embed.copy_(torch.randn(pos_embed.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model_patcher


def tiny_chroma(seed: int = 0):
    """Chroma: Flux's double/single blocks without per-block modulation, plus the distilled guidance layer."""
    return _build("Chroma", CHROMA_UNET, seed)


def tiny_qwen_image(seed: int = 0):
    return _build("QwenImage", QWEN_UNET, seed)


def tiny_hidream(seed: int = 0):
    """HiDream: double- and single-stream blocks with mixture-of-experts feed-forwards."""
    return _build("HiDream", HIDREAM_UNET, seed)


def tiny_wan21(seed: int = 0):
    return _build("WAN21_T2V", WAN_UNET, seed)


def tiny_wan22(seed: int = 0):
    """Wan 2.2 (the 5B layout: 48 latent channels, ComfyUI's WAN22 class)."""
    return _build("WAN22_T2V", WAN22_UNET, seed)


# ------------------------------------------------------------------ conditioning and latents


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def conditioning(family: str, seed: int) -> list:
    """One CONDITIONING entry as the family's text encoders give it (shapes of the tiny models)."""
    g = torch.Generator().manual_seed(seed)
    if family == "SD3.5":
        return [[_randn(g, 1, 8, 32), {"pooled_output": _randn(g, 1, 32)}]]
    if family == "Chroma":  # T5 only: ComfyUI's text encode gives no pooled output
        return [[_randn(g, 1, 8, 32), {"pooled_output": None}]]
    if family == "Qwen-Image":
        return [[_randn(g, 1, 8, QWEN_UNET["joint_attention_dim"]), {}]]
    if family == "HiDream":
        t5_width, llama_width = HIDREAM_UNET["caption_channels"]  # ComfyUI projects T5 with [0], Llama with [1]
        llama = _randn(g, 1, HIDREAM_LLAMA_LAYERS, 8, llama_width)  # [B, Llama layers, L, C]
        return [[_randn(g, 1, 8, t5_width),
                 {"pooled_output": _randn(g, 1, 32), "conditioning_llama3": llama}]]
    if family.startswith("Wan"):
        return [[_randn(g, 1, 8, WAN_UNET["text_dim"]), {}]]
    raise ValueError(family)


def latent_shape(family: str) -> tuple:
    if family == "Wan 2.1":
        return (1, 16, 3, 8, 8)  # [B, C, T, H, W]
    if family == "Wan 2.2":
        return (1, 48, 2, 8, 8)
    if family == "Qwen-Image":
        return (1, 16, 1, 8, 8)  # Qwen-Image samples in the Wan 2.1 latent space: one frame
    return (1, 16, 8, 8)


def sample(model_patcher, family: str, steps: int = 3, seed: int = 0, cfg: float = 2.0):
    """comfy.sample.sample with the family's conditioning: the run a KSampler makes."""
    import comfy.sample

    latent = torch.zeros(latent_shape(family))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, "euler", "simple", conditioning(family, 1),
                               conditioning(family, 2), latent, seed=seed, disable_pbar=True)


# ------------------------------------------------------------------ LoRA files


def linear_shapes(model_patcher, pattern: str) -> dict[str, tuple[int, int]]:
    """{module path without 'diffusion_model.': (out, in)} of the Linear layers whose path matches."""
    out = {}
    for name, module in model_patcher.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(pattern, name):
            out[name] = tuple(module.weight.shape)
    return out


def write_lora(file: Path, layers: dict[str, tuple[int, int]], key_format: str, rank: int = 4, seed: int = 1,
               alpha: float | None = None, metadata: dict | None = None) -> Path:
    """A LoRA on `layers` ({name in the trainer's naming: (out, in)}), keys as the trainer writes them.

    key_format: 'peft' -> '<name>.lora_A.weight' / '.lora_B.weight' (diffusers, ai-toolkit, SimpleTuner,
    diffusion-pipe; the name carries the trainer's prefix); 'peft_default' -> '<name>.lora_A.default.weight'
    (DiffSynth-Studio); 'kohya' -> 'lora_unet_<name with _>.lora_down
    / .lora_up / .alpha' (sd-scripts, musubi-tuner); 'onetrainer' -> 'lora_transformer_<name with _>...'.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_dim, in_dim) in layers.items():
        down = torch.randn(rank, in_dim, generator=generator) * 0.3
        up = torch.randn(out_dim, rank, generator=generator) * 0.3
        if key_format == "peft":
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        elif key_format == "peft_default":  # peft's adapter name left in (DiffSynth-Studio)
            tensors[f"{name}.lora_A.default.weight"], tensors[f"{name}.lora_B.default.weight"] = down, up
        elif key_format in ("kohya", "onetrainer"):
            key = ("lora_unet_" if key_format == "kohya" else "lora_transformer_") + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            raise ValueError(key_format)
    save_file(tensors, str(file), metadata=metadata)
    return file

"""Tiny random image encoders saved in the real on-disk formats, for tests without downloads."""

from __future__ import annotations

import json
import os
import warnings

import torch

TINY_CLIP_ARCH = "PLoRA-Tiny-ViT"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,  # as OpenAI's checkpoints; TorchScript files load with QuickGELU
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def register_tiny_clip_arch(folder: str) -> str:
    """Write the tiny architecture's json into `folder` and register it with open_clip; returns its name."""
    import open_clip

    path = os.path.join(folder, f"{TINY_CLIP_ARCH}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(TINY_CLIP_CONFIG, handle)
    open_clip.add_model_config(path)
    return TINY_CLIP_ARCH


def build_tiny_clip(folder: str, seed: int = 0):
    """A random tiny open_clip model; returns (model, {"safetensors", "pt", "torchscript"} paths)."""
    import open_clip
    from safetensors.torch import save_file

    register_tiny_clip_arch(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_ARCH).eval()
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    paths = {
        "safetensors": os.path.join(folder, "tiny_clip.safetensors"),
        "pt": os.path.join(folder, "tiny_clip_state_dict.pt"),
        "torchscript": os.path.join(folder, "tiny_clip_jit.pt"),
    }
    save_file(state_dict, paths["safetensors"])
    torch.save(state_dict, paths["pt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(paths["torchscript"])
    return model, paths


def _write_preprocessor(folder: str, config: dict) -> None:
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def build_tiny_dino_v1(folder: str, seed: int = 1):
    """A random tiny DINO v1 ViT (dino-vits16 layout, no pooler) in `folder`; returns (model, folder)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=32)
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    _write_preprocessor(folder, {"do_resize": True, "size": 32, "do_normalize": True, "resample": 3,
                                 "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
                                 "image_processor_type": "ViTImageProcessor"})
    return model, folder


def build_tiny_dinov2(folder: str, seed: int = 2):
    """A random tiny DINOv2 in `folder` (resize 40, crop 32 like dinov2's 256/224); returns (model, folder)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          patch_size=8, image_size=32)
    model = Dinov2Model(config).eval()
    model.save_pretrained(folder)
    _write_preprocessor(folder, {"do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
                                 "crop_size": {"height": 32, "width": 32}, "do_normalize": True, "resample": 3,
                                 "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
                                 "image_processor_type": "BitImageProcessor"})
    return model, folder

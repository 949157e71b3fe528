"""Image or video: what a MODEL and a latent are, for the nodes that work on images only.

Metric guidance decodes the predicted latent with the VAE and scores the images with CLIP and
DINO, so it needs one image per sample. Video models (Wan) sample [B, C, T, H, W] latents; the
KL gate works on them, guidance does not. Qwen-Image samples in the Wan VAE's latent space too,
with one frame: an image model.
"""

from __future__ import annotations

import torch

from . import host

# Image models whose latents have a time axis of one frame (they share a video VAE's latent space).
_IMAGE_MODELS_WITH_VIDEO_LATENTS = ("Qwen-Image",)
_IMAGE_FAMILIES = "SD1.5, SDXL, SD3.5, Flux, Chroma, Qwen-Image, HiDream"


def latent_frames(latent: torch.Tensor) -> int:
    """Frames of a latent: 1 for an image latent [B, C, H, W], T for a video latent [B, C, T, H, W]."""
    return int(latent.shape[2]) if latent.ndim == 5 else 1


def is_video_model(model_patcher) -> bool:
    """True for a model that generates video (its latent format has a time axis: Wan 2.1/2.2, ...)."""
    latent_format = model_patcher.get_model_object("latent_format")
    if getattr(latent_format, "latent_dimensions", 2) != 3:
        return False
    return host.model_family(model_patcher).split(" ")[0] not in _IMAGE_MODELS_WITH_VIDEO_LATENTS


def check_image_latent(model_patcher, latent: torch.Tensor, node: str) -> None:
    """Refuse a latent of several video frames, naming the node, the shape and what to do instead.

    A one-frame latent of a video model (Wan used as an image model) is an image and passes.
    """
    frames = latent_frames(latent)
    if frames <= 1:
        return
    kind = "video model" if is_video_model(model_patcher) else "model"
    raise ValueError(
        f"{node}: the latent holds {frames} video frames (shape {tuple(latent.shape)} = [B, C, T, H, W]) for a "
        f"{host.model_family(model_patcher)} {kind}. Metric guidance scores decoded images with CLIP and DINO, so "
        f"it works on image models ({_IMAGE_FAMILIES}) and one-frame latents only. For video, connect the MODEL "
        "from P-LoRA Model Patcher (its KL gate works on video models) to a plain sampler, or set the video "
        "length to 1 frame to make an image."
    )

"""Differentiable image preprocessing for the guidance encoders (PMK, Eq. 16-18).

The encoders see the decoded x0_hat, and the gradient of R must flow back to its pixels,
so everything here is plain torch: no PIL, no rounding to uint8, no clamping.

Layouts: ComfyUI's IMAGE is [B, H, W, C] float in [0, 1]; the encoders take
[B, C, H, W] in [0, 1] and do `preprocess` themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger("plora")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LAYOUTS = ("bhwc", "bchw")


def to_nchw(images: torch.Tensor, layout: str = "bhwc") -> torch.Tensor:
    """[B, H, W, C] (ComfyUI IMAGE, layout="bhwc") or [B, C, H, W] (layout="bchw") -> [B, 3, H, W].

    A single-channel image is repeated to RGB and an alpha channel is dropped; the values are
    left as they are (expected in [0, 1]). A view where possible, so gradients flow.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown image layout {layout!r}; use one of {LAYOUTS}.")
    if images.ndim != 4:
        raise ValueError(
            f"Expected a batch of images with 4 dimensions ({layout}), got shape {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0)."
        )
    nchw = images.permute(0, 3, 1, 2) if layout == "bhwc" else images  # [B, C, H, W]
    channels = nchw.shape[1]
    if channels == 3:
        return nchw
    if channels == 1:
        return nchw.expand(-1, 3, -1, -1)
    if channels == 4:
        return nchw[:, :3]
    raise ValueError(
        f"Expected 1, 3 or 4 colour channels in layout {layout!r}, got shape {tuple(images.shape)}; "
        "check the layout argument (ComfyUI IMAGE is 'bhwc')."
    )


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H', W'] with min(H', W') == size, aspect kept, bicubic with antialias."""
    height, width = images.shape[-2:]
    if min(height, width) < 1:
        raise ValueError(f"Cannot resize an image of size {height} x {width}: connect an image with pixels.")
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new_size == (height, width):
        return images
    # Bicubic with antialias has a backward pass on CPU and CUDA (aten _upsample_bicubic2d_aa).
    return F.interpolate(images, size=new_size, mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size], the middle of the image (H, W >= size)."""
    height, width = images.shape[-2:]
    top = (height - size) // 2
    left = (width - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, [B, 3, H, W]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def preprocess(
    images_nchw_01: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize_size: int | None = None,
) -> torch.Tensor:
    """Resize the shorter side to `resize_size` (default `size`), center-crop size x size, normalise.

    [B, 3, H, W] in [0, 1] -> [B, 3, size, size] float32, differentiable with respect to the input.
    `resize_size` > `size` reproduces "resize 256, crop 224" pipelines such as DINOv2's.
    """
    resize_size = size if resize_size is None else resize_size
    if resize_size < size:
        raise ValueError(f"resize_size {resize_size} is smaller than the crop size {size}.")
    images = images_nchw_01.float()
    images = resize_shorter_side(images, resize_size)
    images = center_crop(images, size)
    return normalize(images, mean, std)

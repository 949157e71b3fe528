"""Images side by side with a label above each: the comparison workflow's one picture.

Pure torch + Pillow (which every ComfyUI install has); images in ComfyUI's IMAGE layout
[B, H, W, C], floats in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_BACKGROUND = (255, 255, 255)
LABEL_TEXT = (20, 20, 20)


def _font(height: int):
    try:
        return ImageFont.load_default(size=height)  # scalable when Pillow has FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def label_strip(text: str, width: int, height: int, channels: int) -> torch.Tensor:
    """[height, width, channels] white strip with `text` centred (cut with '...' when too long)."""
    strip = Image.new("RGB", (width, height), LABEL_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    font = _font(max(8, int(height * 0.6)))
    shown = text
    while shown and draw.textlength(shown, font=font) > width - 4:
        shown = shown[:-4] + "..." if len(shown) > 4 else ""
    box = draw.textbbox((0, 0), shown, font=font)
    position = ((width - (box[2] - box[0])) / 2 - box[0], (height - (box[3] - box[1])) / 2 - box[1])
    draw.text(position, shown, fill=LABEL_TEXT, font=font)
    pixels = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0)
    if channels == 1:
        return pixels.mean(dim=-1, keepdim=True)
    if channels == 4:
        return torch.cat([pixels, torch.ones(height, width, 1)], dim=-1)
    return pixels


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 0, gap: int = 4) -> torch.Tensor:
    """[1, H', W', C]: the batch's images in a grid (`columns` 0 = one row), each under its label.

    Images of different sizes are not possible in one IMAGE batch, so every cell has the same size;
    missing labels are left blank, extra labels are ignored.
    """
    count, height, width, channels = images.shape
    columns = count if columns <= 0 else min(columns, count)
    rows = math.ceil(count / columns)
    label_height = max(16, min(64, height // 12)) if any(labels) else 0
    cell_height = height + label_height
    grid = torch.ones(rows * cell_height + (rows - 1) * gap, columns * width + (columns - 1) * gap, channels)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * (cell_height + gap), column * (width + gap)
        if label_height:
            text = labels[index] if index < len(labels) else ""
            grid[top:top + label_height, left:left + width] = label_strip(text, width, label_height, channels)
        grid[top + label_height:top + cell_height, left:left + width] = images[index].float().cpu()
    return grid.unsqueeze(0)

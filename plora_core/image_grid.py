"""Images side by side with a label above each: the comparison workflow's one picture.

Pure torch + Pillow (which every ComfyUI install has); images in ComfyUI's IMAGE layout
[B, H, W, C], floats in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_BACKGROUND = (255, 255, 255)
LABEL_TEXT = (20, 20, 20)
ELLIPSIS = "..."
MIN_GLYPH_WIDTH = 0.25  # pixels: only zero-width marks are narrower; a strip shows at most 4 x its width in characters


def label_font(height: int):
    """Pillow's default font at `height` pixels where it scales (FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=height)  # scalable when Pillow has FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def label_strip(text: str, width: int, height: int, channels: int) -> torch.Tensor:
    """[height, width, channels] white strip with `text` centred (cut with '...' when too long)."""
    strip = Image.new("RGB", (width, height), LABEL_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    font = label_font(max(8, int(height * 0.6)))
    shown = fitted_text(text, lambda s: draw.textlength(s, font=font), width - 4)
    box = draw.textbbox((0, 0), shown, font=font)
    position = ((width - (box[2] - box[0])) / 2 - box[0], (height - (box[3] - box[1])) / 2 - box[1])
    draw.text(position, shown, fill=LABEL_TEXT, font=font)
    pixels = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0)
    if channels == 1:
        return pixels.mean(dim=-1, keepdim=True)
    if channels == 4:
        return torch.cat([pixels, torch.ones(height, width, 1)], dim=-1)
    return pixels


def fitted_text(text: str, measure: Callable[[str], float], room: float) -> str:
    """`text`, or its longest prefix + '...' whose measured width fits `room` ('' when not even '...' fits).

    A binary search over prefix lengths, bounded by the characters `room` can hold at all: about
    log2(room) measurements of at most 4 x room characters, whatever the length of `text`.
    """
    limit = int(max(room, 0) / MIN_GLYPH_WIDTH) + 1
    if len(text) <= limit and measure(text) <= room:
        return text
    low, high = 0, min(len(text), limit)  # invariant: prefix `low` fits, prefix `high` + 1 does not (or is past)
    if measure(ELLIPSIS) > room:
        return ""
    while low < high:
        middle = (low + high + 1) // 2
        if measure(text[:middle] + ELLIPSIS) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low] + ELLIPSIS


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 0, gap: int = 4,
                  should_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """[1, H', W', C]: the batch's images in a grid (`columns` 0 = one row), each under its label.

    Images of different sizes are not possible in one IMAGE batch, so every cell has the same size;
    missing labels are left blank, extra labels are ignored. `should_stop()` is called before each cell
    and raises to abandon the drawing (ComfyUI's interruption).
    """
    if images.ndim != 4 or min(images.shape) < 1 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected a non-empty [B, H, W, C] image batch with 1, 3 or 4 channels, got shape "
                         f"{tuple(images.shape)}.")
    count, height, width, channels = images.shape
    columns = count if columns <= 0 else min(columns, count)
    rows = math.ceil(count / columns)
    label_height = max(16, min(64, height // 12)) if any(labels) else 0
    cell_height = height + label_height
    grid = torch.ones(rows * cell_height + (rows - 1) * gap, columns * width + (columns - 1) * gap, channels)
    for index in range(count):
        if should_stop is not None:
            should_stop()
        row, column = divmod(index, columns)
        top, left = row * (cell_height + gap), column * (width + gap)
        if label_height:
            text = labels[index] if index < len(labels) else ""
            grid[top:top + label_height, left:left + width] = label_strip(text, width, label_height, channels)
        grid[top + label_height:top + cell_height, left:left + width] = images[index].float().cpu()
    return grid.unsqueeze(0)

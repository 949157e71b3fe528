"""A picture of the gate's decisions: which LoRA each gated layer passed on at each step.

Columns are denoising steps (left = first), rows are gated layers in the order the model runs
them; one colour per LoRA of the set: orange = the first (the pair's subject) LoRA's features
were passed on, blue = the second's (the pair's style, Eq. 13), then green, red, ... for a
third, fourth LoRA; purple = all of them (a direct merge), dark grey = none (not gated,
outside the window, or a rule that leaves the LoRAs out there, as B-LoRA does outside its two
blocks). Where the recorder knows the files, a legend under the map names each colour's LoRA.
This is the view of the paper's Figure 5: the choice depends on the input and the step.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .image_grid import fitted_text, label_font
from .recorder import BOTH_INDEX, SelectionRecorder

SUBJECT_COLOUR = (0.96, 0.58, 0.16)
STYLE_COLOUR = (0.22, 0.47, 0.96)
BOTH_COLOUR = (0.62, 0.33, 0.78)
UNSEEN_COLOUR = (0.16, 0.16, 0.16)
# one colour per LoRA of the set, by index (the pair: subject, style); past the list they repeat
LORA_COLOURS = (SUBJECT_COLOUR, STYLE_COLOUR, (0.20, 0.72, 0.36), (0.89, 0.22, 0.25), (0.95, 0.85, 0.20),
                (0.30, 0.80, 0.85), (0.93, 0.45, 0.75), (0.60, 0.45, 0.30))
LEGEND_ROW = 14  # pixels per legend line
LEGEND_WIDTH = 320  # pixels of text at most beside a swatch (longer file names are cut with '...')


def recorded_images(recorder: SelectionRecorder, kind: int | None = None) -> int | None:
    """How many images the last run decided for: the rows of the `kind` pass (COND or UNCOND), or
    of a model call with kind None. None when the run did not record which rows were which pass."""
    if kind is None:
        masks = [value for value, _ in recorder.entries.values()]
    elif recorder.kind_entries:
        masks = [value for (_, _, k), (value, _) in recorder.kind_entries.items() if k == kind]
    else:
        return None
    return max((int(mask.shape[0]) for mask in masks), default=0)


def lora_colour(index: int) -> tuple[float, float, float]:
    return LORA_COLOURS[index % len(LORA_COLOURS)]


def _paint(grid: torch.Tensor, cell: int) -> torch.Tensor:
    """[layers, steps] grid of set indices (BOTH_INDEX all, NaN unseen) -> [1, H, W, 3] image."""
    image = torch.empty(*grid.shape, 3)
    image[:] = torch.tensor(UNSEEN_COLOUR)
    for index in sorted({int(v) for v in grid[grid >= 0].tolist()}):
        image[grid == index] = torch.tensor(lora_colour(index))
    image[grid == BOTH_INDEX] = torch.tensor(BOTH_COLOUR)
    if grid.numel() == 0:
        image = torch.tensor(UNSEEN_COLOUR).expand(1, 1, 3).clone()
    image = image.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    if cell >= 4:  # thin separators between cells
        image[cell - 1::cell, :, :] *= 0.6
        image[:, cell - 1::cell, :] *= 0.6
    return image.unsqueeze(0)


def legend(names: tuple[str, ...], roles: tuple[str, ...], width: int) -> torch.Tensor:
    """[1, H, W', 3] strip naming each LoRA's colour (`role: file`), W' >= width; then "all" and "none".
    Text wider than max(width, LEGEND_WIDTH) is cut (`image_grid.fitted_text`), so a long name cannot
    make the image wide."""
    lines = [(lora_colour(i), f"{roles[i] if i < len(roles) else 'lora'}: {name}") for i, name in enumerate(names)]
    lines += [(BOTH_COLOUR, "all (merged)"), (UNSEEN_COLOUR, "none (not gated)")]
    font = label_font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    room = max(width - 22, LEGEND_WIDTH)
    lines = [(colour, fitted_text(text, lambda s: measure.textlength(s, font=font), room)) for colour, text in lines]
    text_width = max(int(measure.textlength(text, font=font)) for _, text in lines)
    canvas = Image.new("RGB", (max(width, text_width + 22), LEGEND_ROW * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (colour, text) in enumerate(lines):
        top = 2 + row * LEGEND_ROW
        draw.rectangle((3, top + 2, 13, top + 11), fill=tuple(int(c * 255) for c in colour), outline=(90, 90, 90))
        draw.text((18, top), text, fill=(20, 20, 20), font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).unsqueeze(0)


def with_legend(image: torch.Tensor, recorder: SelectionRecorder) -> torch.Tensor:
    """The map with the legend under it (both padded to one width), where the recorder knows the files."""
    if not recorder.names:
        return image
    strip = legend(recorder.names, recorder.roles, image.shape[2])
    width = max(image.shape[2], strip.shape[2])

    def padded(picture):
        canvas = torch.ones(1, picture.shape[1], width, 3)
        canvas[:, :, :picture.shape[2]] = picture
        return canvas
    return torch.cat([padded(image), padded(strip)], dim=1)


def selection_map(recorder: SelectionRecorder, sample: int = 0, kind: int | None = None,
                  cell: int = 8) -> torch.Tensor:
    """[1, H, W, 3] float image in ComfyUI's IMAGE layout; the map is layers * cell high, steps * cell wide,
    with the legend under it where the recorder knows the LoRA files."""
    _, _, matrix = recorder.as_matrix(sample, kind, by_lora=True)  # [steps, layers]
    return with_legend(_paint(matrix.T, cell), recorder)  # [layers, steps]


def blank_map(layers: int, steps: int, cell: int = 8) -> torch.Tensor:
    """The map of a run in which the gate decided nothing: every (step, layer) cell grey."""
    return _paint(torch.full((max(layers, 1), max(steps, 1)), float("nan")), cell)

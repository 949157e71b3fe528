"""A picture of the gate's decisions: which LoRA each gated layer passed on at each step.

Columns are denoising steps (left = first), rows are gated layers in the order the model runs
them; orange = the subject LoRA's features were passed on, blue = the style LoRA's (Eq. 13),
purple = both (a direct merge), dark grey = neither (not gated, outside the window, or a
rule that leaves both LoRAs out there, as B-LoRA does outside its two blocks).
This is the view of the paper's Figure 5: the choice depends on the input and the step.
"""

from __future__ import annotations

import torch

from .recorder import BOTH_VALUE, SelectionRecorder

SUBJECT_COLOUR = (0.96, 0.58, 0.16)
STYLE_COLOUR = (0.22, 0.47, 0.96)
BOTH_COLOUR = (0.62, 0.33, 0.78)
UNSEEN_COLOUR = (0.16, 0.16, 0.16)


def recorded_images(recorder: SelectionRecorder, kind: int | None = None) -> int | None:
    """How many images the last run decided for: the rows of the `kind` pass (COND or UNCOND), or
    of a model call with kind None. None when the run did not record which rows were which pass."""
    if kind is None:
        masks = list(recorder.decisions.values())
    elif recorder.by_kind:
        masks = [mask for (_, _, k), mask in recorder.by_kind.items() if k == kind]
    else:
        return None
    return max((int(mask.shape[0]) for mask in masks), default=0)


def _paint(grid: torch.Tensor, cell: int) -> torch.Tensor:
    """[layers, steps] grid (1 subject, 0 style, 0.5 both, NaN unseen) -> [1, H, W, 3] image."""
    image = torch.empty(*grid.shape, 3)
    image[:] = torch.tensor(UNSEEN_COLOUR)
    image[grid == 1] = torch.tensor(SUBJECT_COLOUR)
    image[grid == 0] = torch.tensor(STYLE_COLOUR)
    image[grid == BOTH_VALUE] = torch.tensor(BOTH_COLOUR)
    if grid.numel() == 0:
        image = torch.tensor(UNSEEN_COLOUR).expand(1, 1, 3).clone()
    image = image.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    if cell >= 4:  # thin separators between cells
        image[cell - 1::cell, :, :] *= 0.6
        image[:, cell - 1::cell, :] *= 0.6
    return image.unsqueeze(0)


def selection_map(recorder: SelectionRecorder, sample: int = 0, kind: int | None = None,
                  cell: int = 8) -> torch.Tensor:
    """[1, H, W, 3] float image in ComfyUI's IMAGE layout; H = layers * cell, W = steps * cell."""
    _, _, matrix = recorder.as_matrix(sample, kind)  # [steps, layers]
    return _paint(matrix.T, cell)  # [layers, steps]


def blank_map(layers: int, steps: int, cell: int = 8) -> torch.Tensor:
    """The map of a run in which the gate decided nothing: every (step, layer) cell grey."""
    return _paint(torch.full((max(layers, 1), max(steps, 1)), float("nan")), cell)

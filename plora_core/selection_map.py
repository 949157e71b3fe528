"""A picture of the gate's decisions: which LoRA each gated layer passed on at each step.

Columns are denoising steps (left = first), rows are gated layers in the order the model runs
them; orange = the subject LoRA's features were passed on, blue = the style LoRA's (Eq. 13).
This is the view of the paper's Figure 5: the choice depends on the input and the step.
"""

from __future__ import annotations

import torch

from .recorder import SelectionRecorder

SUBJECT_COLOUR = (0.96, 0.58, 0.16)
STYLE_COLOUR = (0.22, 0.47, 0.96)
UNSEEN_COLOUR = (0.16, 0.16, 0.16)


def selection_map(recorder: SelectionRecorder, sample: int = 0, kind: int | None = None,
                  cell: int = 8) -> torch.Tensor:
    """[1, H, W, 3] float image in ComfyUI's IMAGE layout; H = layers * cell, W = steps * cell."""
    _, _, matrix = recorder.as_matrix(sample, kind)  # [steps, layers]
    grid = matrix.T  # [layers, steps]
    image = torch.empty(*grid.shape, 3)
    image[:] = torch.tensor(UNSEEN_COLOUR)
    image[grid == 1] = torch.tensor(SUBJECT_COLOUR)
    image[grid == 0] = torch.tensor(STYLE_COLOUR)
    if grid.numel() == 0:
        image = torch.tensor(UNSEEN_COLOUR).expand(1, 1, 3).clone()
    image = image.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    if cell >= 4:  # thin separators between cells
        image[cell - 1::cell, :, :] *= 0.6
        image[:, cell - 1::cell, :] *= 0.6
    return image.unsqueeze(0)

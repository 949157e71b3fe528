"""Normal-tensor copies of host models, so autograd can backprop through them.

ComfyUI loads weights under inference mode, and inference tensors cannot be saved for
backward. The copy is made outside inference mode; the model the user passed is untouched.
"""

from __future__ import annotations

import copy

import torch


def frozen_normal_copy(module: torch.nn.Module, device=None) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are normal tensors, frozen, in eval mode."""
    with torch.inference_mode(False):
        duplicate = copy.deepcopy(module)
        for tensor in list(duplicate.parameters()) + list(duplicate.buffers()):
            tensor.data = tensor.data.clone()
        duplicate.requires_grad_(False).eval()
    return duplicate if device is None else duplicate.to(device)


def copy_tensors_as_saved():
    """Autograd hooks that copy each tensor as it is saved for backward.

    Host blocks that add residuals in place (ComfyUI's CLIP vision; the 2024 core's UNet)
    otherwise make backward fail with "modified by an inplace operation".
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)

"""Normal-tensor copies of host models, so autograd can backprop through them.

ComfyUI loads weights under inference mode, and inference tensors cannot be saved for
backward. `frozen_normal_copy` builds a second module tree of the same classes that holds
normal-tensor copies of the parameters and buffers and nothing the host attached: it never
deep-copies a host module. Under dynamic VRAM, current ComfyUI hangs native buffer handles
(and pinned-memory state, lowvram patches) on its modules; `copy.deepcopy` would duplicate a
handle whose `__del__` frees the original's memory, or fail on one that refuses to be copied.

Why a structural copy and not `torch.func.functional_call` over the original module: the
original's forward consults those host attributes (current ComfyUI's cast path reads the
weights from the native buffer when a module has one), so swapping in our tensors would not
reliably put them on the path autograd sees; and the original would be modified, however
briefly, while the guidance runs. The copy's forward sees only its own tensors. ComfyUI's VAE
(`first_stage_model`), TAESD and CLIP vision models keep nothing but sub-modules, parameters,
buffers, configuration values and functions (the attention function) on their modules, which
is exactly what is copied (checked on ComfyUI v0.3.64 by the host tests).
"""

from __future__ import annotations

import enum
import functools
import logging
import types

import torch

logger = logging.getLogger("plora")

_MODULE_FIELDS = frozenset(vars(torch.nn.Module()))  # what Module.__init__ sets up: made fresh for the copy
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size,
                torch.memory_format, torch.layout, enum.Enum, type, types.FunctionType, types.BuiltinFunctionType)


def _plain(value) -> bool:
    """Configuration a forward may read: numbers, strings, dtypes, plain functions, containers of them.

    Anything else (a host handle, a bound method, a lowvram patch object) is left out of the copy."""
    if isinstance(value, _PLAIN_TYPES):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_plain(key) and _plain(item) for key, item in value.items())
    if isinstance(value, functools.partial):
        return _plain(value.func) and _plain(value.args) and _plain(value.keywords)
    return False


def _tensor_copy(tensor: torch.Tensor, device) -> torch.Tensor:
    return tensor.detach().to(device=device if device is not None else tensor.device, copy=True)


def _copy_module(module: torch.nn.Module, device, memo: dict, path: str, skipped: list) -> torch.nn.Module:
    if id(module) in memo:  # a module used twice in the tree stays one module
        return memo[id(module)]
    duplicate = type(module).__new__(type(module))
    torch.nn.Module.__init__(duplicate)
    memo[id(module)] = duplicate
    for name, value in vars(module).items():
        if name in _MODULE_FIELDS:
            continue
        if isinstance(value, torch.Tensor):
            duplicate.__dict__[name] = _tensor_copy(value, device)
        elif _plain(value):
            duplicate.__dict__[name] = value.copy() if isinstance(value, (list, dict, set)) else value
        else:
            skipped.append(f"{path}{name} ({type(value).__name__})")
    for name, parameter in module._parameters.items():
        if parameter is not None and id(parameter) not in memo:  # tied weights stay tied
            memo[id(parameter)] = torch.nn.Parameter(_tensor_copy(parameter, device), requires_grad=False)
        duplicate._parameters[name] = None if parameter is None else memo[id(parameter)]
    for name, buffer in module._buffers.items():
        duplicate._buffers[name] = None if buffer is None else _tensor_copy(buffer, device)
    duplicate._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        duplicate._modules[name] = None if child is None else _copy_module(child, device, memo, f"{path}{name}.",
                                                                           skipped)
    return duplicate


def frozen_normal_copy(module: torch.nn.Module, device=None) -> torch.nn.Module:
    """A new module tree of the same classes: parameters and buffers as normal tensors (frozen, eval
    mode, on `device` if given), configuration values and functions shared; nothing else of the host."""
    skipped: list[str] = []
    with torch.inference_mode(False), torch.no_grad():
        duplicate = _copy_module(module, device, {}, "", skipped)
    duplicate.requires_grad_(False).eval()
    if skipped:
        logger.debug("P-LoRA: differentiable copy of %s leaves out host attributes: %s", type(module).__name__,
                     ", ".join(skipped))
    return duplicate


def copy_tensors_as_saved():
    """Autograd hooks that copy each tensor as it is saved for backward.

    Host blocks that add residuals in place (ComfyUI's CLIP vision)
    otherwise make backward fail with "modified by an inplace operation".
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)

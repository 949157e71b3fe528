"""Reading LoRA files from disk: tensors, metadata, checks, and a small cache.

Parsed files are cached at module level keyed by (path, modification time, size), so
a node that runs again on the same files does not read them again, and an edited file
is read anew.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

logger = logging.getLogger("plora")

_CACHE_ENTRIES = 4
_cache: "OrderedDict[tuple, LoraFile]" = OrderedDict()


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file and what to do."""


@dataclass
class LoraFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def _read_pickle(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraFileError(f"LoRA file {path} holds a {type(data).__name__}, not a dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def check_finite(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise on the first tensor with NaN or Inf, naming it (a broken training run or save)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraFileError(
                f"LoRA file {path}: tensor '{key}' contains NaN or Inf values. The training run or "
                "the save was broken; use an earlier checkpoint of this LoRA or retrain it."
            )


def read_lora_file(path: str) -> LoraFile:
    """Load a .safetensors (or .pt/.ckpt/.bin) LoRA, checked, through the module-level cache."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise LoraFileError(f"LoRA file {path} cannot be opened ({error.strerror}).") from error
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    try:
        if path.lower().endswith(".safetensors"):
            tensors, metadata = _read_safetensors(path)
        else:
            tensors, metadata = _read_pickle(path)
    except LoraFileError:
        raise
    except Exception as error:  # safetensors and torch raise several types for a damaged file
        raise LoraFileError(
            f"LoRA file {path} could not be read ({type(error).__name__}: {error}). It is probably "
            "truncated or not a LoRA file; download or export it again."
        ) from error
    if not tensors:
        raise LoraFileError(f"LoRA file {path} holds no tensors; download or export it again.")
    check_finite(path, tensors)
    lora = LoraFile(path, tensors, dict(metadata))
    _cache[key] = lora
    while len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    logger.debug("read LoRA %s (%d tensors)", path, len(tensors))
    return lora


def read_header(path: str) -> tuple[dict[str, tuple], dict[str, str]]:
    """{key: shape} and metadata of a .safetensors file without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # damaged headers raise several types
        raise LoraFileError(f"{path} could not be read ({type(error).__name__}: {error}).") from error
    return shapes, dict(metadata)


def metadata_json(metadata: dict[str, str], key: str):
    """A JSON-valued metadata entry (kohya stores several), or None when absent or invalid."""
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, TypeError):
        return None

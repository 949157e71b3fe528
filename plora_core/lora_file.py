"""Reading LoRA files from disk: tensors, metadata, checks, and a cache bounded in bytes.

Files are opened as `files` allows (regular files only; safetensors files (`.safetensors`, `.sft`)
through safetensors and PyTorch pickles (`.pt`, `.pth`, `.ckpt`, `.bin`) only through
`torch.load(weights_only=True)`); any other file is refused without being read. Error messages name
the file by the name the caller gives (the name in ComfyUI's model folder), never by its path on the
server, printable (`files.shown_name`); files whose names are not valid UTF-8 are still read.

Parsed files are cached at module level keyed by (path, modification time, size), so a node
that runs again on the same files does not read them again, and an edited file is read anew.
The cache (`LORA_CACHE`, a `SizedCache`) holds at most `LORA_CACHE.limit` bytes of tensors and is
emptied when ComfyUI frees memory (see `glue/memory_hooks.py`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from .files import (file_kind, is_torchscript_archive, is_utf8_path, read_safetensors_bytes, regular_file_stat, scrub,
                    shown_name)
from .sized_cache import GIB, SizedCache

logger = logging.getLogger("plora")

HEADER_LIMIT = 100 * 1024 ** 2  # safetensors' own limit on the JSON header


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file and what to do."""

    __module__ = "plora"  # ComfyUI reports module + class name; the pack's install path stays out of /history


@dataclass
class LoraFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    label: str = ""  # the name shown in messages (the name in models/loras); defaults to the file name
    version: tuple = ()  # (absolute path, mtime_ns, size) of the file as it was read

    @property
    def name(self) -> str:
        return self.label or os.path.basename(self.path)


def tensors_nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


LORA_CACHE = SizedCache(2 * GIB, lambda lora: tensors_nbytes(lora.tensors.values()))


def clear_lora_cache() -> None:
    """Forget every parsed LoRA (its memory is freed once no node output holds it)."""
    LORA_CACHE.clear()


def _read_safetensors(path: str, label: str, should_stop=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata; `should_stop()` between tensors (it raises to abandon the read)."""
    from safetensors import safe_open

    if not is_utf8_path(path):
        return read_safetensors_bytes(path, label), read_header(path, label)[1]
    tensors = {}
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            if should_stop is not None:
                should_stop()
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def _read_pickle(path: str, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if is_torchscript_archive(path):
        raise LoraFileError(f"LoRA file {label} is a TorchScript archive, not a LoRA; export the LoRA as .safetensors.")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraFileError(f"LoRA file {label} holds a {type(data).__name__}, not a dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def check_finite(label: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise on the first tensor with NaN or Inf, naming it (a broken training run or save)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraFileError(
                f"LoRA file {label}: tensor '{key}' contains NaN or Inf values. The training run or "
                "the save was broken; use an earlier checkpoint of this LoRA or retrain it."
            )


def read_lora_file(path: str, label: str | None = None, should_stop=None) -> LoraFile:
    """Load a .safetensors/.sft (or .pt/.pth/.ckpt/.bin) LoRA, checked, through the module-level cache.

    `label` is the name messages use (the name in models/loras, see `shown_name`); by default the file
    name. `should_stop()`, when given, is called between tensors and raises to abandon the read (ComfyUI's
    interruption).
    """
    label = label or shown_name(os.path.basename(path))
    kind = file_kind(path)
    if kind is None:
        raise LoraFileError(f"LoRA file {label} is not a .safetensors, .sft, .pt, .pth, .ckpt or .bin file; "
                            "pick a LoRA file.")
    info = regular_file_stat(path)
    if info is None:
        raise LoraFileError(f"LoRA file {label} is not a regular file that can be read.")
    key = (os.path.abspath(path), info.st_mtime_ns, info.st_size)
    cached = LORA_CACHE.get(key)
    if cached is not None:
        return cached if cached.label == label else LoraFile(cached.path, cached.tensors, cached.metadata, label,
                                                             cached.version)
    stops: list[BaseException] = []

    def stop() -> None:
        try:
            should_stop()
        except BaseException as stopped:
            stops.append(stopped)
            raise

    try:
        if kind == "safetensors":
            tensors, metadata = _read_safetensors(path, label, stop if should_stop is not None else None)
        else:
            tensors, metadata = _read_pickle(path, label)
    except LoraFileError:
        raise
    except Exception as error:  # safetensors and torch raise several types for a damaged file
        if error in stops:
            raise  # an interruption, not a damaged file
        raise LoraFileError(
            f"LoRA file {label} could not be read ({type(error).__name__}: {scrub(str(error), path, label)}). "
            "It is probably truncated or not a LoRA file; download or export it again."
        ) from error
    if not tensors:
        raise LoraFileError(f"LoRA file {label} holds no tensors; download or export it again.")
    check_finite(label, tensors)
    lora = LoraFile(path, tensors, dict(metadata), label, key)
    LORA_CACHE.put(key, lora)
    logger.debug("read LoRA %s (%d tensors)", label, len(tensors))
    return lora


def read_header(path: str, label: str | None = None) -> tuple[dict[str, tuple], dict[str, str]]:
    """{key: shape} and metadata of a .safetensors/.sft file without reading its tensors.

    The header's length is checked first (at most HEADER_LIMIT bytes); a file whose name is not valid UTF-8
    (which safetensors' reader does not open) has its JSON header parsed here.
    """
    label = label or shown_name(os.path.basename(path))
    if file_kind(path) != "safetensors" or regular_file_stat(path) is None:
        raise LoraFileError(f"{label} is not a safetensors file that can be read.")
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > HEADER_LIMIT or length < 2:
                raise ValueError(f"header length {length} is not between 2 and {HEADER_LIMIT} bytes")
            if is_utf8_path(path):
                return _safetensors_header(path)
            raw = handle.read(length)
        if len(raw) != length:
            raise ValueError(f"the file ends inside its header ({len(raw)} of {length} bytes)")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        shapes = {key: _shape(entry) for key, entry in header.items()}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings")
    except Exception as error:  # damaged headers raise several types (safetensors: its own SafetensorError)
        raise LoraFileError(f"{label} could not be read ({type(error).__name__}: "
                            f"{scrub(str(error), path, label)}).") from error
    return shapes, dict(metadata)


def _safetensors_header(path: str) -> tuple[dict[str, tuple], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, dict(metadata)


def _shape(entry) -> tuple[int, ...]:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise ValueError(f"a tensor entry has no valid shape: {str(entry)[:80]}")
    return tuple(shape)

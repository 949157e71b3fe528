"""Reading LoRA files from disk: tensors, metadata, checks, and a cache bounded in bytes.

Only regular files are opened (never a FIFO, a device or a directory: those would block or
mislead the reader), safetensors files (`.safetensors`, `.sft`) through safetensors and
PyTorch pickles (`.pt`, `.pth`, `.ckpt`, `.bin`) only through `torch.load(weights_only=True)`;
any other file is refused without being read. Error messages name the file by the name the
caller gives (the name in ComfyUI's model folder), never by its path on the server, and with the
bytes of a name that is not valid UTF-8 escaped (`shown_name`): a lone surrogate in a message or
log line kills the log writer of the server that prints it. Such files are still read.

Parsed files are cached at module level keyed by (path, modification time, size), so a node
that runs again on the same files does not read them again, and an edited file is read anew.
The cache holds at most `LORA_CACHE.limit` bytes of tensors and is emptied when ComfyUI frees
memory (see `nodes/__init__.py`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger("plora")

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
HEADER_LIMIT = 100 * 1024 ** 2  # safetensors' own limit on the JSON header
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
GIB = 1024 ** 3


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


class SizedCache:
    """A least-recently-used cache bounded by the bytes its values hold (not by their count).

    A value larger than the whole limit is returned to its caller but not kept. Thread-safe:
    ComfyUI's worker thread fills it while the server's event loop may read its size.
    """

    def __init__(self, limit_bytes: int, size_of: Callable[[object], int]):
        self.limit = int(limit_bytes)
        self._size_of = size_of
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple, value):
        size = int(self._size_of(value))
        with self._lock:
            self._entries.pop(key, None)
            if size <= self.limit:
                self._entries[key] = (value, size)
            self._evict()
        return value

    def set_limit(self, limit_bytes: int) -> None:
        with self._lock:
            self.limit = int(limit_bytes)
            self._evict()

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        while total > self.limit and self._entries:
            _, (_, size) = self._entries.popitem(last=False)
            total -= size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def info(self) -> dict:
        """{"entries", "bytes", "limit_bytes"}, for the cache route and tests."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": sum(s for _, s in self._entries.values()),
                    "limit_bytes": self.limit}


def tensors_nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


LORA_CACHE = SizedCache(2 * GIB, lambda lora: tensors_nbytes(lora.tensors.values()))


def clear_lora_cache() -> None:
    """Forget every parsed LoRA (its memory is freed once no node output holds it)."""
    LORA_CACHE.clear()


def shown_name(name) -> str:
    """`name` safe to print: the bytes of a file name that is not valid UTF-8 (lone surrogates in the str,
    e.g. from an unzipped Latin-1 or CP932 archive) written as escapes: b'caf\\xe9' -> 'caf\\xe9'."""
    name = str(name)
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a surrogate that no file name decodes to (e.g. '\\ud800' from JSON)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8_path(path: str) -> bool:
    """True when `path` encodes to UTF-8 as it is (safetensors' Rust reader takes no other path)."""
    try:
        path.encode("utf-8")
    except UnicodeError:
        return False
    return True


def regular_file_stat(path: str) -> os.stat_result | None:
    """os.stat of `path` when it is a regular file (symlinks followed), else None.

    Checked before any open: a FIFO would block the reader, a device or directory would
    mislead it.
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def is_torchscript_archive(path: str) -> bool:
    """A TorchScript archive (a zip holding constants.pkl): loading it with torch.jit runs code from the file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())


def file_kind(path: str) -> str | None:
    """'safetensors', 'pickle' or None (not a weights file the pack reads), from the extension alone."""
    lower = path.lower()
    if lower.endswith(SAFETENSORS_EXTENSIONS):
        return "safetensors"
    if lower.endswith(PICKLE_EXTENSIONS):
        return "pickle"
    return None


def _spellings(path: str) -> list[str]:
    """How a library may print `path`: as given, escaped, or with U+FFFD for the bytes that are not UTF-8."""
    escaped = shown_name(path)
    replaced = os.fsencode(path).decode("utf-8", "replace") if path else path
    return sorted({path, escaped, replaced, repr(path)[1:-1]}, key=len, reverse=True)


def scrub(text: str, path: str, label: str) -> str:
    """A library's error text with the file's server path (and its folder) replaced by its name, safe to
    print (see `shown_name`)."""
    folder = os.path.dirname(path)
    for spelling in _spellings(path):
        text = text.replace(spelling, label)
    if folder:
        for spelling in _spellings(folder):
            text = text.replace(spelling + os.sep, "").replace(spelling, "<model folder>")
    return shown_name(text)


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


def read_safetensors_bytes(path: str, label: str) -> dict[str, torch.Tensor]:
    """A safetensors file read through Python's open (any file name the OS takes) and parsed from memory."""
    from safetensors.torch import load

    with open(path, "rb") as handle:
        data = handle.read()
    return load(data)


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


def metadata_json(metadata: dict[str, str], key: str):
    """A JSON-valued metadata entry (kohya stores several), or None when absent or invalid."""
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, TypeError):
        return None

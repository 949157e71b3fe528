"""Weight files on disk, read safely: what kind a file is, which files may be opened, names safe to print.

Shared by the LoRA reader (`lora_file`) and the encoder loaders (`encoders`). Only regular files are
opened (never a FIFO, a device or a directory: those would block or mislead the reader), and the kind
of a file is told from its extension: safetensors (`.safetensors`, `.sft`) or PyTorch pickle (`.pt`,
`.pth`, `.ckpt`, `.bin`). Messages name a file by the name the caller gives (the name in ComfyUI's
model folder), never by its path on the server (`scrub`), and with the bytes of a name that is not
valid UTF-8 escaped (`shown_name`): a lone surrogate in a message or log line kills the log writer of
the server that prints it. Such files are still read (`read_safetensors_bytes`).
"""

from __future__ import annotations

import json
import os
import stat
import zipfile

import torch

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


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


def read_safetensors_bytes(path: str, label: str) -> dict[str, torch.Tensor]:
    """A safetensors file read through Python's open (any file name the OS takes) and parsed from memory."""
    from safetensors.torch import load

    with open(path, "rb") as handle:
        data = handle.read()
    return load(data)


def metadata_json(metadata: dict[str, str], key: str):
    """A JSON-valued metadata entry (kohya stores several), or None when absent or invalid."""
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, TypeError):
        return None

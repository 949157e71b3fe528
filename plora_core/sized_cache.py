"""A least-recently-used cache bounded in bytes, for the pack's module-level caches of large values.

The parsed LoRA files (`lora_file.LORA_CACHE`) and the loaded encoders (`encoders.ENCODER_CACHE`) are
kept in one each, keyed by (path, modification time, size, ...), so an edited file is read anew.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

GIB = 1024 ** 3


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

"""The pack's module caches follow ComfyUI's memory management.

Parsed LoRAs, loaded encoders and every cache registered with `register_cache` (K-LoRA's Top-K
sums, the open_clip config scan) are emptied when ComfyUI unloads all models (`/free` with
`unload_models` or `free_memory`, an out-of-memory error, `--disable-smart-memory`) and when
it has to unload models to make room (`free_memory` unloaded something).
"""

import functools
import logging

from ..plora_core.encoders import release_encoders
from ..plora_core.lora_file import clear_lora_cache
from . import host

logger = logging.getLogger("plora")


_REGISTERED: list = []  # clear() callables of the glue's module-level caches


def register_cache(clear) -> None:
    """Have `clear()` called whenever the pack's caches are released (a module-level cache's own clear)."""
    if clear not in _REGISTERED:
        _REGISTERED.append(clear)


def release_caches(unload: bool = True) -> None:
    """Empty the pack's caches; with `unload`, also move live encoders off the accelerator."""
    clear_lora_cache()
    for clear in list(_REGISTERED):
        clear()
    if unload:
        release_encoders()
    else:
        from ..plora_core.encoders import clear_encoder_cache

        clear_encoder_cache()


_CALLBACKS = "__plora_release_callbacks__"


def _run(callbacks, *args) -> None:
    for callback in list(callbacks):
        try:
            callback(*args)
        except Exception:  # a cache that fails to empty must not stop ComfyUI from freeing memory
            logger.exception("P-LoRA: releasing a cache failed")


def _wrap_unload_all_models(original, callbacks):
    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        _run(callbacks, True)
        return original(*args, **kwargs)
    return unload_all_models


def _wrap_free_memory(original, callbacks):
    @functools.wraps(original)
    def free_memory(*args, **kwargs):
        unloaded = original(*args, **kwargs)
        if unloaded:  # ComfyUI had to unload models to make room: give back what the caches hold
            _run(callbacks, False)
        return unloaded
    return free_memory


def install_memory_hooks() -> None:
    """Wrap comfy.model_management.unload_all_models and free_memory (module attributes: that is how
    ComfyUI's /free handling, its OOM handler and its loaders call them, in v0.3.x and later).

    Wrapped once per process; every copy of the pack that is imported adds its own release.
    """
    mm = host.model_management()

    for attribute, wrap in (("unload_all_models", _wrap_unload_all_models), ("free_memory", _wrap_free_memory)):
        current = getattr(mm, attribute)
        callbacks = getattr(current, _CALLBACKS, None)
        if callbacks is None:
            callbacks = []
            wrapper = wrap(current, callbacks)
            setattr(wrapper, _CALLBACKS, callbacks)
            setattr(mm, attribute, wrapper)
        if release_caches not in callbacks:
            callbacks.append(release_caches)

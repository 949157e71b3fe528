"""Small HTTP routes for the frontend extension: what a LoRA or checkpoint file is made for, and the
pack's cache sizes.

Files are named and answered by their name inside the model folder (never a server path), found as
ComfyUI's loaders find them, and only headers of regular safetensors files are read. Headers are read
off ComfyUI's event loop (a worker thread: a huge header never stalls /system_stats or the websocket),
one file at a time, and the answers are cached by path, modification time and size (at most
DETAILS_CACHE_ENTRIES), so a frontend asking eight times reads the file once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict

from ..plora_core.encoders import ENCODER_CACHE
from ..plora_core.files import file_kind, regular_file_stat, shown_name
from ..plora_core.lora_file import LORA_CACHE, LoraFileError, read_header
from ..plora_core.lora_info import checkpoint_family, lora_family, lora_rank, trigger_words
from . import host

logger = logging.getLogger("plora")

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")
DETAILS_CACHE_ENTRIES = 256
_details_cache: OrderedDict[tuple, dict] = OrderedDict()
_details_lock = threading.Lock()  # one header read at a time; the others then find it cached


def lora_details(path: str, name: str) -> dict:
    """Family, rank and trigger words of a LoRA file (from its header only); `name` as in models/loras."""
    if file_kind(path) != "safetensors":
        return {"name": name, "family": "unknown", "rank": None, "trigger_words": []}
    shapes, metadata = read_header(path, name)
    return {"name": name, "family": lora_family(shapes, metadata), "rank": lora_rank(shapes),
            "trigger_words": trigger_words(metadata)}


def model_details(path: str, name: str) -> dict:
    if file_kind(path) != "safetensors":
        return {"name": name, "family": "unknown"}
    shapes, _ = read_header(path, name)
    return {"name": name, "family": checkpoint_family(shapes)}


def cached_details(build, path: str, name: str) -> dict:
    """build(path, name), cached by (build, path, mtime, size, name); bounded to DETAILS_CACHE_ENTRIES."""
    info = regular_file_stat(path)
    if info is None:
        raise LoraFileError(f"{name} is not a regular file that can be read.")
    key = (build.__name__, path, info.st_mtime_ns, info.st_size, name)
    with _details_lock:
        details = _details_cache.get(key)
        if details is None:
            details = build(path, name)
            _details_cache[key] = details
            while len(_details_cache) > DETAILS_CACHE_ENTRIES:
                _details_cache.popitem(last=False)
        _details_cache.move_to_end(key)
        return details


async def answer(build, folder: str, name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a details request; the disk is touched only in a worker thread."""
    try:  # resolving may touch the disk, reading a header may take a while: never on the event loop
        path = await asyncio.to_thread(host.resolve_model_file, folder, name)
    except FileNotFoundError:
        return 404, {"error": f"'{shown_name(name)}' is not in models/{folder}"}
    try:
        return 200, await asyncio.to_thread(cached_details, build, path, host.model_label(folder, name))
    except LoraFileError as error:
        return 422, {"error": str(error)}


def cache_details() -> dict:
    """What the pack's module caches hold now (entries, bytes, limit)."""
    return {"loras": LORA_CACHE.info(), "encoders": ENCODER_CACHE.info()}


def register_routes() -> None:
    """GET /plora/lora_info?name=..., /plora/model_info?folder=checkpoints&name=... and /plora/cache_info,
    inside ComfyUI."""
    from aiohttp import web

    routes = host.prompt_server_routes()
    if routes is None:
        return

    async def respond(build, folder: str, name: str):
        status, body = await answer(build, folder, name)
        return web.json_response(body, status=status)

    @routes.get("/plora/lora_info")
    async def lora_info(request):
        return await respond(lora_details, "loras", request.query.get("name", ""))

    @routes.get("/plora/model_info")
    async def model_info(request):
        folder = request.query.get("folder", "checkpoints")
        if folder not in MODEL_FOLDERS:
            return web.json_response({"error": f"folder must be one of {MODEL_FOLDERS}"}, status=400)
        return await respond(model_details, folder, request.query.get("name", ""))

    @routes.get("/plora/cache_info")
    async def cache_info(request):
        return web.json_response(cache_details())

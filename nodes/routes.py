"""Small HTTP routes for the frontend extension: what a LoRA or checkpoint file is made for, and the
pack's cache sizes.

Files are named and answered by their name inside the model folder (never a server path), found as
ComfyUI's loaders find them, and only headers of regular safetensors files are read.
"""

from __future__ import annotations

import logging

from ..plora_core.encoders import ENCODER_CACHE
from ..plora_core.lora_file import LORA_CACHE, LoraFileError, file_kind, read_header
from ..plora_core.lora_info import checkpoint_family, lora_family, lora_rank, trigger_words
from . import host

logger = logging.getLogger("plora")

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")


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


def cache_details() -> dict:
    """What the pack's module caches hold now (entries, bytes, limit)."""
    return {"loras": LORA_CACHE.info(), "encoders": ENCODER_CACHE.info()}


def register_routes() -> None:
    """GET /plora/lora_info?name=..., /plora/model_info?folder=checkpoints&name=... and /plora/cache_info,
    inside ComfyUI."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    routes = PromptServer.instance.routes

    def answer(build, folder: str, name: str):
        try:
            path = host.resolve_model_file(folder, name)
        except FileNotFoundError:
            return web.json_response({"error": f"'{name}' is not in models/{folder}"}, status=404)
        try:
            return web.json_response(build(path, host.model_name(folder, name)))
        except LoraFileError as error:
            return web.json_response({"error": str(error)}, status=422)

    @routes.get("/plora/lora_info")
    async def lora_info(request):
        return answer(lora_details, "loras", request.query.get("name", ""))

    @routes.get("/plora/model_info")
    async def model_info(request):
        folder = request.query.get("folder", "checkpoints")
        if folder not in MODEL_FOLDERS:
            return web.json_response({"error": f"folder must be one of {MODEL_FOLDERS}"}, status=400)
        return answer(model_details, folder, request.query.get("name", ""))

    @routes.get("/plora/cache_info")
    async def cache_info(request):
        return web.json_response(cache_details())

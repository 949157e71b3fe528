"""Small HTTP routes for the frontend extension: what a LoRA or checkpoint file is made for."""

from __future__ import annotations

import logging
import os

from ..plora_core.lora_file import LoraFileError, read_header
from ..plora_core.lora_info import checkpoint_family, lora_family, lora_rank, trigger_words

logger = logging.getLogger("plora")

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")


def lora_details(path: str) -> dict:
    """Family, rank and trigger words of a LoRA file (from its header only)."""
    if not path.lower().endswith(".safetensors"):
        return {"name": os.path.basename(path), "family": "unknown", "rank": None, "trigger_words": []}
    shapes, metadata = read_header(path)
    return {"name": os.path.basename(path), "family": lora_family(shapes, metadata), "rank": lora_rank(shapes),
            "trigger_words": trigger_words(metadata)}


def model_details(path: str) -> dict:
    if not path.lower().endswith(".safetensors"):
        return {"name": os.path.basename(path), "family": "unknown"}
    shapes, _ = read_header(path)
    return {"name": os.path.basename(path), "family": checkpoint_family(shapes)}


def register_routes() -> None:
    """GET /plora/lora_info?name=... and /plora/model_info?folder=checkpoints&name=..., inside ComfyUI."""
    try:
        import folder_paths
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    routes = PromptServer.instance.routes

    def answer(build, folder: str, name: str):
        path = folder_paths.get_full_path(folder, name) if name else None
        if path is None:
            return web.json_response({"error": f"'{name}' is not in models/{folder}"}, status=404)
        try:
            return web.json_response(build(path))
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

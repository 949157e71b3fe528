"""A fake ComfyUI server on loopback for scripts/evaluate.py's tests (the real routes and JSON shapes).

It validates prompts as ComfyUI does (node types, required inputs, link types, combo values, uploaded
LoadImage files), answers 400 with node_errors, streams executing/progress/executed events on /ws,
keeps /history entries, serves /view and /upload/image, and "renders" tiny PNGs. Its PLoRAScore answer
is a hash of the three images it was given (`fake_scores`), so a test can recompute every score.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import threading
import uuid
import zlib

from aiohttp import web

CKPT, CLIP_FILE, DINO = "sdxl.safetensors", "ViT-B-32.pt", "dino-vits16"
LORAS = ["dog.safetensors", "cat.safetensors", "watercolour.safetensors", "oil.safetensors"]
PATCHER_METHODS = ["p-lora", "direct", "k-lora", "b-lora"]


# ---------------------------------------------------------------------------- the fake server


def _node(required, output, optional=None, output_node=False):
    return {"input": {"required": required, **({"optional": optional} if optional else {})},
            "output": output, "output_node": output_node, "name": "", "category": "test"}


def _int(default):
    return ["INT", {"default": default, "min": 0, "max": 1 << 31}]


def _float(default):
    return ["FLOAT", {"default": default, "min": -100.0, "max": 1000.0}]


def _sampler_inputs():
    return {"model": ["MODEL"], "seed": _int(0), "steps": _int(20), "cfg": _float(8.0),
            "sampler_name": [["euler", "dpmpp_2m"]], "scheduler": [["normal", "karras"]],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": _float(1.0)}


def object_info(patcher_method=True, lora_sets=True):
    """The nodes evaluate.py uses, with ComfyUI's and the pack's input names and types.

    lora_sets=False: a pack from before N-LoRA sets (no AddLoRAToSet, PLoRAReference, more_references)."""
    patcher_optional = {"method": [PATCHER_METHODS, {"default": "p-lora"}]} if patcher_method else None
    roles = [["subject", "style"], {"default": "subject"}]
    sets = {
        "AddLoRAToSet": _node({"lora_set": ["PLORA_PAIR"], "lora": [LORAS], "role": roles, "strength": _float(1.0),
                               "bias": _float(1.0)}, ["PLORA_PAIR", "CLIP"], optional={"clip": ["CLIP"]}),
        "PLoRAReference": _node({"image": ["IMAGE"], "role": roles, "weight": _float(1.0)}, ["PLORA_REFERENCES"],
                                optional={"references": ["PLORA_REFERENCES"]}),
    } if lora_sets else {}
    more = {"more_references": ["PLORA_REFERENCES"]} if lora_sets else {}
    return {**sets,
        "CheckpointLoaderSimple": _node({"ckpt_name": [[CKPT, "other.safetensors"]]}, ["MODEL", "CLIP", "VAE"]),
        "EmptyLatentImage": _node({"width": _int(512), "height": _int(512), "batch_size": _int(1)}, ["LATENT"]),
        "CLIPTextEncode": _node({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"]),
        "KSampler": _node(_sampler_inputs(), ["LATENT"]),
        "VAEDecode": _node({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
        "PreviewImage": _node({"images": ["IMAGE"]}, [], output_node=True),
        "LoadImage": _node({"image": [["example.png"], {"image_upload": True}]}, ["IMAGE", "MASK"]),
        "LoraLoader": _node({"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [LORAS],
                             "strength_model": _float(1.0), "strength_clip": _float(1.0)}, ["MODEL", "CLIP"]),
        "LoadSubjectStyleLoRA": _node({"subject_lora": [LORAS], "subject_strength": _float(1.0),
                                       "style_lora": [LORAS], "style_strength": _float(1.0)},
                                      ["PLORA_PAIR", "CLIP"], optional={"clip": ["CLIP"]}),
        "PLoRAModelPatcher": _node({"model": ["MODEL"], "lora_pair": ["PLORA_PAIR"],
                                    "criterion": [["kl", "js", "cosine", "dot"], {"default": "kl"}],
                                    "style_bias": _float(1.0), "start_percent": _float(0.0),
                                    "end_percent": _float(1.0)}, ["MODEL"], optional=patcher_optional),
        "PosteriorMetricGuidanceSampler": _node(
            {**_sampler_inputs(), "vae": ["VAE"], "subject_reference": ["IMAGE"], "style_reference": ["IMAGE"],
             "clip_encoder": ["PLORA_ENCODER"], "guidance_scale": _float(10.0), "clip_subject_weight": _float(1.0),
             "clip_style_weight": _float(1.0), "dino_style_weight": _float(1.0),
             "gradient_mode": [["fast", "exact"], {"default": "fast"}], "guidance_start": _float(0.0),
             "guidance_end": _float(1.0), "guide_every": _int(1)},
            ["LATENT", "STRING"], optional={"dino_encoder": ["PLORA_ENCODER"], "guidance_decoder": ["VAE"],
                                            "guidance_decode_size": _int(0), **more}),
        "LoadPLoRACLIPEncoder": _node({"checkpoint": [[CLIP_FILE]], "architecture": [["ViT-B-32", "ViT-L-14"]],
                                       "precision": [["auto", "fp32"]]}, ["PLORA_ENCODER"]),
        "LoadPLoRADINOEncoder": _node({"model_folder": [[DINO]], "precision": [["auto", "fp32"]]}, ["PLORA_ENCODER"]),
        "PLoRAScore": _node({"images": ["IMAGE"], "subject_reference": ["IMAGE"], "style_reference": ["IMAGE"],
                             "clip_encoder": ["PLORA_ENCODER"], "dino_encoder": ["PLORA_ENCODER"]},
                            ["STRING", "FLOAT", "FLOAT", "FLOAT"], output_node=True),
        "ImageScale": _node({"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bilinear", "area"]],
                             "width": _int(512), "height": _int(512), "crop": [["disabled", "center"]]}, ["IMAGE"]),
        "ImageBatch": _node({"image1": ["IMAGE"], "image2": ["IMAGE"]}, ["IMAGE"]),
        "EmptyImage": _node({"width": _int(512), "height": _int(512), "batch_size": _int(1), "color": _int(0)},
                            ["IMAGE"]),
        "PLoRAComparisonGrid": _node({"images": ["IMAGE"], "labels": ["STRING", {"default": "", "multiline": True}],
                                      "columns": _int(0)}, ["IMAGE"]),
    }


def png(seed: bytes) -> bytes:
    """A 4x4 RGB PNG whose colour is a hash of `seed`."""
    colour = hashlib.sha256(seed).digest()[:3]
    raw = b"".join(b"\x00" + colour * 4 for _ in range(4))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def fake_scores(image: bytes, subject: bytes, style: bytes) -> dict:
    """The fake PLoRAScore: reproducible numbers in [0, 1) from the three images."""
    def unit(*parts):
        return int(hashlib.sha256(b"|".join(parts)).hexdigest()[:8], 16) / 2**32
    return {"style_sim": unit(image, style), "clip_score": unit(image, subject),
            "dino_score": unit(b"dino", image, subject)}


class FakeComfy:
    """A ComfyUI on a free loopback port, in a thread of its own.

    die_at: the n-th prompt (1-based) starts, sends a progress event, and then the server dies
    (websockets closed, listener closed: later connections are refused).
    refuse(prompt) -> node_errors or None; fail(prompt) -> exception message or None: an execution_error;
    hang(prompt) -> True: the prompt runs until interrupted.
    """

    def __init__(self, info=None, die_at=None, refuse=None, fail=None, hang=None):
        self.info = info or object_info()
        self.die_at, self.refuse, self.fail, self.hang = die_at, refuse, fail, hang
        self.prompts: list[dict] = []       # every prompt accepted, in order
        self.refused: list[dict] = []
        self.interrupts: list[str] = []
        self.files = {"input": {}, "temp": {}, "output": {}}
        self.history: dict[str, dict] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.dead = False
        self.loop = asyncio.new_event_loop()
        self.queue: asyncio.Queue | None = None
        self.running: str | None = None
        self.pending: list[tuple] = []
        self.interrupted: set[str] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> str:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/object_info", self._object_info)
        app.router.add_post("/prompt", self._post_prompt)
        app.router.add_get("/history/{prompt_id}", self._history)
        app.router.add_get("/queue", self._get_queue)
        app.router.add_post("/queue", self._post_queue)
        app.router.add_post("/interrupt", self._interrupt)
        app.router.add_get("/view", self._view)
        app.router.add_post("/upload/image", self._upload)
        app.router.add_get("/ws", self._ws)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.queue = asyncio.Queue()
        self.worker = asyncio.ensure_future(self._execute_forever())
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        if not self.dead:
            asyncio.run_coroutine_threadsafe(self._die(), self.loop).result(10)
        asyncio.run_coroutine_threadsafe(self._stop_worker(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _stop_worker(self) -> None:
        self.worker.cancel()
        await asyncio.gather(self.worker, return_exceptions=True)

    async def _die(self) -> None:
        self.dead = True
        for ws in list(self.sockets.values()):
            await ws.close()
        await self.runner.cleanup()

    # --- routes
    async def _object_info(self, request):
        return web.json_response(self.info)

    async def _post_prompt(self, request):
        body = await request.json()
        prompt = body["prompt"]
        errors = self._validate(prompt) or (self.refuse(prompt) if self.refuse else None)
        if errors:
            self.refused.append(prompt)
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation",
                                                "message": "Prompt outputs failed validation", "details": "",
                                                "extra_info": {}}, "node_errors": errors}, status=400)
        prompt_id = str(uuid.uuid4())
        self.prompts.append(prompt)
        item = (len(self.prompts), prompt_id, prompt, {"client_id": body.get("client_id")}, [])
        self.pending.append(item)
        await self.queue.put(item)
        return web.json_response({"prompt_id": prompt_id, "number": item[0], "node_errors": {}})

    def _validate(self, prompt: dict) -> dict:
        errors = {}

        def error(node_id, message, details):
            errors.setdefault(node_id, {"errors": [], "dependent_outputs": [],
                                        "class_type": prompt[node_id]["class_type"]})
            errors[node_id]["errors"].append({"type": "invalid", "message": message, "details": details,
                                              "extra_info": {}})

        for node_id, node in prompt.items():
            spec = self.info.get(node["class_type"])
            if spec is None:
                return {node_id: {"errors": [{"type": "missing_node_type", "message": "missing node type",
                                              "details": node["class_type"], "extra_info": {}}],
                                  "dependent_outputs": [], "class_type": node["class_type"]}}
            declared = {**spec["input"]["required"], **spec["input"].get("optional", {})}
            for name in spec["input"]["required"]:
                if name not in node["inputs"]:
                    error(node_id, "Required input is missing", name)
            for name, value in node["inputs"].items():
                kind = declared.get(name, [None])[0]
                if isinstance(value, list):
                    source = prompt.get(value[0])
                    if source is None or self.info[source["class_type"]]["output"][value[1]] != kind:
                        error(node_id, "Return type mismatch between linked nodes", name)
                elif node["class_type"] == "LoadImage":
                    if value not in self.files["input"]:
                        error(node_id, "Invalid image file", f"image: {value}")
                elif isinstance(kind, list) and value not in kind:
                    error(node_id, "Value not in list", f"{name}: '{value}' not in {kind}")
        return errors

    async def _history(self, request):
        prompt_id = request.match_info["prompt_id"]
        return web.json_response({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def _get_queue(self, request):
        running = [list(item[:4]) for item in self.pending if item[1] == self.running]
        pending = [list(item[:4]) for item in self.pending if item[1] != self.running]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request):
        body = await request.json()
        self.pending = [item for item in self.pending if item[1] not in body.get("delete", [])]
        return web.Response(status=200)

    async def _interrupt(self, request):
        body = await request.json()
        self.interrupts.append(body.get("prompt_id"))
        if body.get("prompt_id") == self.running:
            self.interrupted.add(self.running)
        return web.Response(status=200)

    async def _view(self, request):
        query = request.rel_url.query
        name = "/".join(p for p in (query.get("subfolder"), query["filename"]) if p)
        data = self.files.get(query.get("type", "output"), {}).get(name)
        return web.Response(body=data, content_type="image/png") if data else web.Response(status=404)

    async def _upload(self, request):
        post = await request.post()
        image = post["image"]
        subfolder = post.get("subfolder", "")
        self.files[post.get("type", "input")]["/".join(p for p in (subfolder, image.filename) if p)] = image.file.read()
        return web.json_response({"name": image.filename, "subfolder": subfolder, "type": post.get("type", "input")})

    async def _ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}})
        async for _ in ws:
            pass
        self.sockets.pop(sid, None)
        return ws

    # --- execution
    async def _send(self, client_id, kind, data):
        ws = self.sockets.get(client_id)
        if ws is not None and not ws.closed:
            await ws.send_json({"type": kind, "data": data})

    async def _execute_forever(self):
        while True:
            item = await self.queue.get()
            if item in self.pending:
                await self._execute(*item)

    async def _execute(self, number, prompt_id, prompt, extra, _outputs):
        client, self.running = extra.get("client_id"), prompt_id
        await self._send(client, "execution_start", {"prompt_id": prompt_id})
        outputs, messages, status = {}, [], "success"
        for node_id, node in prompt.items():
            await self._send(client, "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            if node["class_type"] in ("KSampler", "PosteriorMetricGuidanceSampler"):
                steps = node["inputs"]["steps"]
                for step in range(1, steps + 1):
                    await self._send(client, "progress", {"value": step, "max": steps, "prompt_id": prompt_id,
                                                          "node": node_id})
                    if number == self.die_at:
                        await self._die()
                        return
                    await asyncio.sleep(0.001)
                if self.hang and self.hang(prompt):
                    while prompt_id not in self.interrupted:
                        await asyncio.sleep(0.02)
                    messages.append(["execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                                               "node_type": node["class_type"], "executed": []}])
                    await self._send(client, "execution_interrupted", messages[-1][1])
                    status = "error"
                    break
                message = self.fail(prompt) if self.fail else None
                if message:
                    data = {"prompt_id": prompt_id, "node_id": node_id, "node_type": node["class_type"],
                            "executed": [], "exception_message": message, "exception_type": "ValueError",
                            "traceback": ["Traceback ..."], "current_inputs": {}, "current_outputs": {}}
                    messages.append(["execution_error", data])
                    await self._send(client, "execution_error", data)
                    status = "error"
                    break
            output = self._output(prompt, node_id, node)
            if output:
                outputs[node_id] = output
                await self._send(client, "executed", {"node": node_id, "display_node": node_id, "output": output,
                                                      "prompt_id": prompt_id})
        if status == "success":
            messages.append(["execution_success", {"prompt_id": prompt_id}])
            await self._send(client, "execution_success", {"prompt_id": prompt_id})
        self.history[prompt_id] = {"prompt": [number, prompt_id, prompt, extra, []], "outputs": outputs,
                                   "status": {"status_str": status, "completed": status == "success",
                                              "messages": messages}, "meta": {}}
        self.pending = [item for item in self.pending if item[1] != prompt_id]
        self.running = None
        await self._send(client, "executing", {"node": None, "prompt_id": prompt_id})

    def _loaded(self, prompt, link) -> bytes:
        return self.files["input"][prompt[link[0]]["inputs"]["image"]]

    def _output(self, prompt, node_id, node) -> dict | None:
        if node["class_type"] == "PreviewImage":
            name = f"ComfyUI_temp_{uuid.uuid4().hex[:5]}_00001_.png"
            self.files["temp"][name] = png(json.dumps([prompt, node_id], sort_keys=True).encode())
            return {"images": [{"filename": name, "subfolder": "", "type": "temp"}]}
        if node["class_type"] == "PLoRAScore":
            inputs = node["inputs"]
            scores = fake_scores(*(self._loaded(prompt, inputs[name])
                                   for name in ("images", "subject_reference", "style_reference")))
            return {"text": [json.dumps(scores)], "plora_scores": [scores]}
        return None

"""A real ComfyUI server with the pack and tiny models in a temporary base directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parents[2] / "tests"
ROOT = TESTS.parent
PACK_FOLDER = "plora"
CHECKPOINT = "tiny_sd15.safetensors"
SUBJECT_LORA = "tiny_subject_dog.safetensors"
STYLE_LORA = "tiny_style_watercolour.safetensors"
THIRD_LORA = "tiny_subject_cat.safetensors"  # a third LoRA (kohya), for sets of N LoRAs
CLIP_FILE = "tiny_clip.safetensors"
DINO_FOLDER = "tiny_dino"
# A checkpoint ComfyUI's loader detects as SD1.5: full channel/context widths, reduced depth.
SD15_REDUCED = dict(
    model_channels=320, context_dim=768, channel_mult=[1, 1], num_res_blocks=[1, 1], transformer_depth=[1, 0],
    transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=-1, num_heads=8, num_head_channels=-1,
    use_checkpoint=False, legacy=False, use_spatial_transformer=True, in_channels=4, out_channels=4,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32,
)
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _random_state(module: torch.nn.Module, seed: int, scale: float = 0.02) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in module.state_dict().items():
        if "position_ids" in key:
            out[key] = tensor.clone()
        elif key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                           "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight", ".0.weight"))\
                and tensor.ndim == 1:
            out[key] = torch.ones_like(tensor)
        else:
            out[key] = (torch.randn(tensor.shape, generator=generator) * scale).to(tensor.dtype)
    return out


def write_checkpoint(path: Path) -> None:
    """UNet (reduced SD1.5), full-size SD VAE and CLIP-L text model, random, in checkpoint key layout."""
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models

    unet = comfy.supported_models.SD15(dict(SD15_REDUCED)).get_model({})
    tensors = {f"model.{k}": v for k, v in _random_state(unet, 0).items() if k.startswith("diffusion_model.")}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    tensors.update({f"first_stage_model.{k}": v for k, v in _random_state(vae, 1).items()})
    clip = comfy.sd1_clip.SDClipModel(device="cpu")
    tensors.update({f"cond_stage_model.{k}": v for k, v in _random_state(clip, 2).items()
                    if k.startswith("transformer.")})
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}, str(path))


def write_loras(folder: Path) -> None:
    """A kohya subject LoRA (with kohya metadata), a peft style LoRA and a third (kohya) LoRA for the checkpoint's
    attention layers."""
    import comfy.supported_models
    import comfy.utils

    unet = comfy.supported_models.SD15(dict(SD15_REDUCED)).get_model({})
    paths = [n for n, m in unet.named_modules()
             if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"))]
    names = {f"diffusion_model.{ldm[:-len('.weight')]}": d[:-len(".weight")]
             for d, ldm in comfy.utils.unet_to_diffusers(unet.model_config.unet_config).items()
             if d.endswith(".weight")}
    generator, third_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    subject, style, third = {}, {}, {}
    for path in paths:
        out_dim, in_dim = comfy.utils.get_attr(unet, path).weight.shape
        key = "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")
        subject[f"{key}.lora_down.weight"] = torch.randn(8, in_dim, generator=generator) * 0.05
        subject[f"{key}.lora_up.weight"] = torch.randn(out_dim, 8, generator=generator) * 0.05
        subject[f"{key}.alpha"] = torch.tensor(8.0)
        style[f"unet.{names[path]}.lora_A.weight"] = torch.randn(4, in_dim, generator=generator) * 0.05
        style[f"unet.{names[path]}.lora_B.weight"] = torch.randn(out_dim, 4, generator=generator) * 0.05
        third[f"{key}.lora_down.weight"] = torch.randn(4, in_dim, generator=third_generator) * 0.05
        third[f"{key}.lora_up.weight"] = torch.randn(out_dim, 4, generator=third_generator) * 0.05
    tags = json.dumps({"10_sks": {"sks dog": 30, "dog": 12, "grass": 2}})
    metadata = {"ss_base_model_version": "sd_v1", "ss_tag_frequency": tags}
    save_file(subject, str(folder / SUBJECT_LORA), metadata=metadata)
    save_file(style, str(folder / STYLE_LORA))
    save_file(third, str(folder / THIRD_LORA), metadata={"ss_base_model_version": "sd_v1"})


def write_encoders(models: Path) -> None:
    from support import tiny_encoders

    clip_folder = models / "open_clip"
    clip_folder.mkdir(parents=True, exist_ok=True)
    _, paths = tiny_encoders.build_tiny_clip(str(clip_folder))
    os.replace(paths["safetensors"], clip_folder / CLIP_FILE)
    for leftover in (paths["pt"], paths["torchscript"]):
        os.remove(leftover)
    dino = models / "dino" / DINO_FOLDER
    dino.mkdir(parents=True, exist_ok=True)
    tiny_encoders.build_tiny_dino_v1(str(dino))


TEST_NODES_FOLDER = "plora_test_nodes"
ANY_VALUE_NODE = "PLoRATestAnyValue"
SINK_NODE = "PLoRATestSink"
# A test-only custom node pack: the "any type" output many packs use (its type compares equal to every
# input type, so ComfyUI's validation lets any value through a link), and an output node taking anything.
TEST_NODES_SOURCE = f'''"""Test-only nodes written by the P-LoRA server tests; not part of the pack."""
import json


class AnyType(str):
    def __ne__(self, other):
        return False


ANY = AnyType("*")


class {ANY_VALUE_NODE}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"value_json": ("STRING", {{"default": "null"}})}}}}

    RETURN_TYPES = (ANY,)
    FUNCTION = "emit"
    CATEGORY = "testing"

    def emit(self, value_json):
        return (json.loads(value_json),)


class {SINK_NODE}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"value": (ANY, {{}})}}}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "take"
    CATEGORY = "testing"

    def take(self, value):
        return {{"ui": {{"text": [type(value).__name__]}}}}


NODE_CLASS_MAPPINGS = {{"{ANY_VALUE_NODE}": {ANY_VALUE_NODE}, "{SINK_NODE}": {SINK_NODE}}}
'''


def write_test_nodes(base: Path) -> None:
    folder = base / "custom_nodes" / TEST_NODES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(TEST_NODES_SOURCE)


def build_base_directory(base: Path) -> Path:
    """A copy of this repo in custom_nodes/plora (as a git clone would be), and tiny models."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    pack = base / "custom_nodes" / PACK_FOLDER
    if pack.is_symlink():
        pack.unlink()
    if not pack.exists():  # a copy: ComfyUI's static routes do not follow symlinks
        shutil.copytree(ROOT, pack, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache",
                                                                   ".ruff_cache", "benchmarks", "tests"))
    models = base / "models"
    for folder in ("checkpoints", "loras"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    write_checkpoint(models / "checkpoints" / CHECKPOINT)
    write_loras(models / "loras")
    write_encoders(models)
    write_test_nodes(base)
    return base


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(checkout: str, base: Path, *args: str) -> list[str]:
    launcher = TESTS / "support" / "comfyui_launcher.py"
    return [sys.executable, str(launcher), checkout, "--cpu", "--base-directory", str(base), "--disable-auto-launch",
            *args]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url = url
        self.process = process
        self.log = log

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")  # /free answers with no body
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a queued prompt once it has finished (bounded wait)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; log:\n{self.log.read_text()[-3000:]}")

    def view(self, image: dict):
        """A PIL image the server saved, from its /view route."""
        from io import BytesIO

        from PIL import Image

        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as response:
            return Image.open(BytesIO(response.read())).copy()

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format prompt and wait (bounded) for its history entry."""
        status, answer = self.post("/prompt", {"prompt": prompt})
        assert status == 200, answer
        return self.wait(answer["prompt_id"], timeout)


@contextmanager
def running_server(checkout: str, base: Path, startup_timeout: float = 180, extra_args: tuple[str, ...] = (),
                   log_name: str = "comfyui.log"):
    port = free_port()
    log = base / log_name
    with open(log, "w") as handle:
        process = subprocess.Popen(launcher_command(checkout, base, "--listen", "127.0.0.1", "--port", str(port),
                                                    *extra_args),
                                   stdout=handle, stderr=subprocess.STDOUT, cwd=checkout)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.time() + startup_timeout
        while True:
            try:
                server.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start; log:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()

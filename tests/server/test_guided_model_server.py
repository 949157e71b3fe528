"""PLoRAMetricGuidance in a running ComfyUI: the guided MODEL under the sampler nodes people use.

Each sampler node runs the same seed with the plain and the guided MODEL; the score R of Eq. 19
(written out below on the pack's tiny encoders, from the PNGs the server saved) must be lower
with guidance, as it is with PosteriorMetricGuidanceSampler. With guidance_scale 0 the node's MODEL
samples bit for bit like the plain one.
"""

import numpy as np
import pytest
from support import server_support
import torch
import torch.nn.functional as F
from PIL import Image

SEED = 5
STEPS = 4
CFG = 4.0
SIDE = 64
# The tiny random encoders see every image as nearly alike (R is about 0.03), so R's gradient is small:
# m = 1000 moves the latent by about 1 and lowers R by about 6e-4, far above the PNGs' rounding
# (m = 10, the paper's value for real encoders, lowers it by only 4e-6 here).
M = 1000.0
SUBJECT, STYLE = "plora_guidance_subject.png", "plora_guidance_style.png"


@pytest.fixture(scope="module")
def reference_files(base_directory):
    """Two reference images in ComfyUI's input folder (LoadImage reads them there)."""
    folder = base_directory / "input"
    folder.mkdir(exist_ok=True)
    generator = np.random.default_rng(7)
    images = {}
    for name, size in ((SUBJECT, (48, 48)), (STYLE, (40, 56))):
        pixels = generator.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        images[name] = torch.from_numpy(pixels).float().div(255).movedim(-1, 0)[None]  # [1, 3, H, W]
    return images


@pytest.fixture(scope="module")
def encoders(base_directory):
    """The server's tiny CLIP and DINO, loaded here from the same files."""
    from support import tiny_encoders
    from plora_pack.plora_core.encoders import load_dino_encoder, load_open_clip_encoder

    models = base_directory / "models"
    tiny_encoders.register_tiny_clip_arch(str(base_directory))
    clip = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, str(models / "open_clip" / server_support.CLIP_FILE))
    dino = load_dino_encoder(str(models / "dino" / server_support.DINO_FOLDER))
    return clip, dino


def residual(images, references, encoders):
    """Eq. 16-19 with unit weights: R = 1 - (cos CLIP(subject) + cos CLIP(style) + cos DINO(style)) / 3."""
    clip, dino = encoders
    with torch.no_grad():
        clip_x, dino_x = clip.embed(images), dino.embed(images)
        subject, style = references[SUBJECT], references[STYLE]
        total = (F.cosine_similarity(clip_x, clip.embed(subject)) + F.cosine_similarity(clip_x, clip.embed(style))
                 + F.cosine_similarity(dino_x, dino.embed(style)))
    return 1 - total / 3


def base_prompt(scale: float = M) -> dict:
    """Loaders, prompts, references, encoders and the guided MODEL ("guided")."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server_support.CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog, wtrclr", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "flux": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "subject": {"class_type": "LoadImage", "inputs": {"image": SUBJECT}},
        "style": {"class_type": "LoadImage", "inputs": {"image": STYLE}},
        "clip": {"class_type": "LoadPLoRACLIPEncoder", "inputs": {
            "checkpoint": server_support.CLIP_FILE, "architecture": "PLoRA-Tiny-ViT", "precision": "fp32"}},
        "dino": {"class_type": "LoadPLoRADINOEncoder", "inputs": {"model_folder": server_support.DINO_FOLDER,
                                                                  "precision": "fp32"}},
        "guided": {"class_type": "PLoRAMetricGuidance", "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "subject_reference": ["subject", 0],
            "style_reference": ["style", 0], "clip_encoder": ["clip", 0], "dino_encoder": ["dino", 0],
            "guidance_scale": scale, "clip_subject_weight": 1.0, "clip_style_weight": 1.0, "dino_style_weight": 1.0,
            "gradient_mode": "fast", "guidance_start": 0.0, "guidance_end": 1.0, "guide_every": 1,
            "guidance_decode_size": 0, "guidance_units": "sampler"}},
    }


def custom_advanced(prompt: dict, name: str, model, guider: str) -> str:
    """SamplerCustomAdvanced (RandomNoise, KSamplerSelect, BasicScheduler) with a CFGGuider or a BasicGuider."""
    if guider == "cfg":
        prompt[f"{name}_guider"] = {"class_type": "CFGGuider", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "cfg": CFG}}
    else:  # Flux users: BasicGuider on FluxGuidance conditioning (cfg 1)
        prompt[f"{name}_guider"] = {"class_type": "BasicGuider", "inputs": {"model": model,
                                                                             "conditioning": ["flux", 0]}}
    prompt[f"{name}_noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
    prompt[f"{name}_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt[f"{name}_sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": model, "scheduler": "normal", "steps": STEPS, "denoise": 1.0}}
    prompt[name] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": [f"{name}_noise", 0], "guider": [f"{name}_guider", 0], "sampler": [f"{name}_sampler", 0],
        "sigmas": [f"{name}_sigmas", 0], "latent_image": ["latent", 0]}}
    return name


def ksampler_advanced(prompt: dict, name: str, model) -> str:
    prompt[name] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": model, "add_noise": "enable", "noise_seed": SEED, "steps": STEPS, "cfg": CFG,
        "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
        "latent_image": ["latent", 0], "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    return name


def saved(prompt: dict, name: str, sampler: str) -> None:
    """The sampler's latent saved as a file and decoded to a PNG, both under `name`."""
    prompt[f"{name}_latent"] = {"class_type": "SaveLatent", "inputs": {
        "samples": [sampler, 0], "filename_prefix": f"latents/plora_{name}"}}
    prompt[f"{name}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["ckpt", 2]}}
    prompt[f"{name}_image"] = {"class_type": "SaveImage", "inputs": {"images": [f"{name}_decode", 0],
                                                                      "filename_prefix": f"plora_{name}"}}


def results(server, base_directory, prompt: dict) -> dict:
    """{name: (latent, image [1, 3, H, W])} of every `saved` output."""
    from safetensors.torch import load_file

    history = server.run_prompt(prompt, timeout=600)
    assert history["status"]["status_str"] == "success", history["status"]
    out = {}
    for node_id, output in history["outputs"].items():
        if node_id.endswith("_image"):
            image = np.asarray(server.view(output["images"][0]).convert("RGB"), dtype=np.float32) / 255
            out.setdefault(node_id[:-len("_image")], {})["image"] = torch.from_numpy(image).movedim(-1, 0)[None]
        if node_id.endswith("_latent"):
            file = output["latents"][0]
            path = base_directory / "output" / file["subfolder"] / file["filename"]
            out.setdefault(node_id[:-len("_latent")], {})["latent"] = load_file(str(path))["latent_tensor"]
    return out


@pytest.fixture(scope="module")
def sampled(server, base_directory, reference_files):
    """Every sampler node with the plain and the guided MODEL, one prompt."""
    prompt = base_prompt()
    for guider in ("cfg", "basic"):
        for variant, model in (("plain", ["ckpt", 0]), ("guided", ["guided", 0])):
            saved(prompt, f"{guider}_{variant}", custom_advanced(prompt, f"sca_{guider}_{variant}", model, guider))
    for variant, model in (("plain", ["ckpt", 0]), ("guided", ["guided", 0])):
        saved(prompt, f"ksa_{variant}", ksampler_advanced(prompt, f"ksa_run_{variant}", model))
    prompt["node"] = {"class_type": "PosteriorMetricGuidanceSampler", "inputs": {
        **{k: v for k, v in prompt["guided"]["inputs"].items()}, "seed": SEED, "steps": STEPS, "cfg": CFG,
        "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
        "latent_image": ["latent", 0], "denoise": 1.0}}
    saved(prompt, "node", "node")
    return results(server, base_directory, prompt)


@pytest.mark.parametrize("pair", ["cfg", "basic", "ksa"])
def test_the_guided_model_lowers_the_score_under_each_sampler_node(sampled, reference_files, encoders, pair):
    plain, guided = sampled[f"{pair}_plain"], sampled[f"{pair}_guided"]
    r_plain = residual(plain["image"], reference_files, encoders)
    r_guided = residual(guided["image"], reference_files, encoders)
    assert not torch.equal(plain["latent"], guided["latent"])
    assert (r_guided < r_plain).all(), (pair, r_plain, r_guided)


def test_the_sampler_node_lowers_it_alike_and_equals_the_guided_model_under_ksampler_advanced(
        sampled, reference_files, encoders):
    """KSamplerAdvanced over all steps is KSampler: the guided MODEL there is the sampler node."""
    node, ksa = sampled["node"], sampled["ksa_guided"]
    r_plain = residual(sampled["ksa_plain"]["image"], reference_files, encoders)
    assert (residual(node["image"], reference_files, encoders) < r_plain).all()
    assert torch.allclose(node["latent"], ksa["latent"], rtol=1e-4, atol=1e-4)


def test_zero_scale_samples_bit_for_bit_like_the_plain_model(server, base_directory, reference_files):
    prompt = base_prompt(scale=0.0)
    for variant, model in (("zero_plain", ["ckpt", 0]), ("zero_guided", ["guided", 0])):
        saved(prompt, variant, custom_advanced(prompt, f"sca_{variant}", model, "cfg"))
    out = results(server, base_directory, prompt)
    assert torch.equal(out["zero_plain"]["latent"], out["zero_guided"]["latent"])
    assert torch.equal(out["zero_plain"]["image"], out["zero_guided"]["image"])


def test_the_node_has_tooltips_and_a_description(object_info):
    node = object_info["PLoRAMetricGuidance"]
    assert node["category"] == "P-LoRA" and node["description"] and node["output"] == ["MODEL"]
    for section in ("required", "optional"):
        for name, spec in node["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), name
    assert len(node["output_tooltips"]) == 1
    sampler = object_info["PosteriorMetricGuidanceSampler"]["input_order"]
    assert sampler["required"][-12:] == object_info["PLoRAMetricGuidance"]["input_order"]["required"][1:]
    assert sampler["optional"] == object_info["PLoRAMetricGuidance"]["input_order"]["optional"]

"""Helpers for host-tier tests: tiny ComfyUI models, LoRA files in real formats, the pack as a package."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from support.pack_loader import PACK_NAME, ROOT, load_pack  # noqa: F401  (re-exported for the host tests)


def ensure_cpu() -> None:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


MODEL_FOLDER_KINDS = ("loras", "open_clip", "dino")


def register_test_model_folders(folder) -> None:
    """The pack reads files only inside model folders: make `folder` (pytest's temporary root, under which
    tests write their LoRAs and encoders) a loras/open_clip/dino folder, as extra_model_paths.yaml would.
    Paths the tests pass that lie inside it then resolve as names in that folder."""
    host = load_pack().glue.host
    for kind in MODEL_FOLDER_KINDS:
        host.add_model_folder(kind, str(folder))


SD15_TINY_UNET = dict(
    model_channels=32, context_dim=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, num_heads=2, num_head_channels=-1,
    use_checkpoint=False, legacy=False, use_spatial_transformer=True, in_channels=4, out_channels=4,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32,
)


def _patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def _randomise(model, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def tiny_sd15(seed: int = 0, dtype=torch.float32):
    """A reduced SD1.5 UNet built by ComfyUI itself, random weights, wrapped in a ModelPatcher."""
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_TINY_UNET))
    model = config.get_model({})
    _randomise(model, seed)
    if dtype != torch.float32:
        model.diffusion_model.to(dtype)
        model.diffusion_model.dtype = dtype
    return _patcher(model)


def tiny_flux(seed: int = 0):
    """A one-double-block, one-single-block Flux DiT built by ComfyUI, random weights."""
    import comfy.supported_models

    unet_config = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                       hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                       axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False)
    config = comfy.supported_models.FluxSchnell(unet_config)
    model = config.get_model({})
    _randomise(model, seed)
    return _patcher(model)


SDXL_TINY_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                  "legacy": False, "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256, "in_channels": 4,
                  "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
                  "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 32,
                  "num_head_channels": 16, "transformer_depth_output": [0, 0, 1, 1], "use_temporal_attention": False,
                  "use_temporal_resblock": False}  # SDXL's layout (linear proj_in, ADM of pooled + 6 size embeddings)


def tiny_sdxl(seed: int = 0):
    """A reduced SDXL UNet built by ComfyUI itself (its SDXL model class), random weights."""
    import comfy.supported_models

    model = comfy.supported_models.SDXL(dict(SDXL_TINY_UNET)).get_model({})
    _randomise(model, seed)
    return _patcher(model)


def sdxl_conditioning(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 32, generator=generator), {"pooled_output": torch.randn(1, 32, generator=generator)}]]


def sd15_conditioning(batch: int = 1, seed: int = 0, context_dim: int = 32):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, context_dim, generator=generator), {}]]


def flux_conditioning(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 32, generator=generator), {"pooled_output": torch.randn(1, 32, generator=generator)}]]


def module_shapes(model_patcher, paths: list[str]) -> dict[str, tuple]:
    """{module path: weight shape} for paths inside model_patcher.model."""
    import comfy.utils

    return {p: tuple(comfy.utils.get_attr(model_patcher.model, p).weight.shape) for p in paths}


def attention_paths(model_patcher, names=("to_q", "to_k", "to_v", "to_out.0")) -> list[str]:
    """Every attention projection of the diffusion model, as module paths."""
    out = []
    for name, module in model_patcher.model.named_modules():
        if any(name.endswith(f".{n}") for n in names) and hasattr(module, "weight"):
            out.append(name)
    return sorted(out)


def lora_factors(shape: tuple, rank: int, generator: torch.Generator, scale: float = 0.3):
    """(down, up) factors for a layer of weight shape [out, in(, k, k)]."""
    out_dim, in_dim = shape[0], shape[1]
    kernel = shape[2:]
    down = torch.randn(rank, in_dim, *kernel, generator=generator) * scale
    up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=generator) * scale
    return down, up


def kohya_key(path: str) -> str:
    return "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")


def write_kohya_lora(file: Path, shapes: dict[str, tuple], rank: int = 4, seed: int = 1, alpha: float | None = None,
                     metadata: dict | None = None) -> Path:
    """A kohya-format LoRA (`lora_unet_*.lora_down/up.weight`, `.alpha`) for the given layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, shape in shapes.items():
        down, up = lora_factors(shape, rank, generator)
        key = kohya_key(path)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    save_file(tensors, str(file), metadata=metadata)
    return file


def diffusers_names(model_patcher) -> dict[str, str]:
    """ldm module path -> diffusers module name, from ComfyUI's own conversion table."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    return {f"diffusion_model.{ldm[:-len('.weight')]}": d[:-len(".weight")]
            for d, ldm in table.items() if d.endswith(".weight")}


def write_peft_lora(file: Path, model_patcher, shapes: dict[str, tuple], rank: int = 4, seed: int = 2) -> Path:
    """A diffusers/peft-format LoRA (`unet.<diffusers name>.lora_A/lora_B.weight`, no alpha)."""
    names = diffusers_names(model_patcher)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, shape in shapes.items():
        down, up = lora_factors(shape, rank, generator)
        tensors[f"unet.{names[path]}.lora_A.weight"] = down.reshape(rank, -1) if len(shape) == 2 else down
        tensors[f"unet.{names[path]}.lora_B.weight"] = up.reshape(shape[0], rank) if len(shape) == 2 else up
    save_file(tensors, str(file))
    return file


def sample(model_patcher, steps: int = 4, seed: int = 0, cfg: float = 4.0, sampler: str = "euler",
           positive=None, negative=None, callback=None, latent_shape=(1, 4, 8, 8)):
    import comfy.sample

    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = positive if positive is not None else sd15_conditioning(seed=1)
    negative = negative if negative is not None else sd15_conditioning(seed=2)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               seed=seed, callback=callback, disable_pbar=True)


TINY_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                   "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """A ComfyUI VAE object with a tiny AutoencoderKL (x2 upscale), random weights."""
    import comfy.sd

    config = dict(TINY_VAE_CONFIG, z_channels=latent_channels)
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": config, "embed_dim": latent_channels}})
    _randomise(vae.first_stage_model, seed, scale=0.1)
    vae.latent_channels = latent_channels
    return vae


def tiny_sd15_with_pair(pack, folder: Path):
    """(tiny SD1.5, a LoRA pair on all its attention projections: kohya subject, peft style, attention paths)."""
    model = tiny_sd15()
    attention = attention_paths(model)
    subject = write_kohya_lora(folder / "subject.safetensors", module_shapes(model, attention))
    style = write_peft_lora(folder / "style.safetensors", model, module_shapes(model, attention))
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    return model, pair, attention

"""Per-step cost of the P-LoRA gate against a direct merge, measured side by side in one run.

Builds an SD1.5-shaped UNet with ComfyUI (random weights), writes two rank-64 kohya
LoRAs on every attention, feed-forward and projection layer of its transformers, and
times sampling steps for: the base model; both LoRAs merged directly (two LoraLoaders);
the P-LoRA KL gate. Prints seconds per step and the ratio gate/direct.

    python benchmarks/gate_speed.py                 # 64x64 latent (512x512), CUDA if present
    python benchmarks/gate_speed.py --latent 32     # 256x256, quicker on a CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("plora.benchmark")

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def use_comfyui_checkout() -> None:
    """With COMFYUI_PATH set, measure against that ComfyUI instead of an installed 2024 core."""
    sys.path.insert(0, str(ROOT / "tests"))
    from comfyui_checkout import bind_checkout_packages, find_checkout

    checkout = find_checkout()
    if checkout:
        bind_checkout_packages(checkout)


def load_pack():
    spec = importlib.util.spec_from_file_location("plora_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["plora_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def build_unet(device_name: str, dtype: torch.dtype):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    model = config.get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.diffusion_model.to(dtype)
    model.diffusion_model.dtype = dtype
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def write_lora(model_patcher, file: Path, rank: int, seed: int) -> None:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model_patcher.model.diffusion_model.named_modules():
        if not name.endswith(LORA_LAYERS) or not hasattr(module, "weight"):
            continue
        shape = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=generator) * 0.01
        up_shape = (shape[0], rank, *([1] * (len(shape) - 2)))
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(file))


def seconds_per_step(model_patcher, steps: int, latent: int, repeats: int) -> float:
    import comfy.sample

    shape = (1, 4, latent, latent)
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    stamps = []

    def on_step(step, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    best = float("inf")
    for _ in range(repeats):
        stamps.clear()
        zeros = torch.zeros(shape)
        comfy.sample.sample(model_patcher, comfy.sample.prepare_noise(zeros, 0), steps, 7.0, "euler", "normal",
                            positive, negative, zeros, seed=0, callback=on_step, disable_pbar=True)
        # the first step includes loading and patching; time the steps after it
        best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: fp16 on CUDA, fp32 on CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    use_comfyui_checkout()
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    load_pack()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if torch.cuda.is_available() else "fp32")]
    model = build_unet("cuda" if torch.cuda.is_available() else "cpu", dtype)

    from plora_pack.nodes.gating import LoraChoice, SubjectStyleLoras, build_gated_model
    from plora_pack.nodes.lora_mapping import map_lora_onto_model
    from plora_pack.plora_core.lora_file import read_lora_file

    with tempfile.TemporaryDirectory() as folder:
        files = [Path(folder) / "subject.safetensors", Path(folder) / "style.safetensors"]
        for seed, file in enumerate(files):
            write_lora(model, file, args.rank, seed)
        loras = [read_lora_file(str(f)) for f in files]
        direct = model.clone()
        for lora in loras:
            direct.add_patches(map_lora_onto_model(model, lora).raw_patches, 1.0)
        gated = build_gated_model(model, SubjectStyleLoras(LoraChoice(loras[0], 1.0), LoraChoice(loras[1], 1.0)))
        gated_layers = len(gated.object_patches)
        variants = (("base", model), ("direct merge", direct), ("P-LoRA gate", gated))
        times = {name: float("inf") for name, _ in variants}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
            for name, patcher in variants:
                times[name] = min(times[name], seconds_per_step(patcher, args.steps, args.latent, 1))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    logger.info("SD1.5-shaped UNet, latent %dx%d (%dx%d px), batch 1 + CFG, rank-%d LoRAs, %d gated layers, %s, %s",
                args.latent, args.latent, 8 * args.latent, 8 * args.latent, args.rank, gated_layers, dtype, device)
    for name, seconds in times.items():
        logger.info("  %-13s %8.3f s/step", name, seconds)
    logger.info("ratio gate/direct per step: %.3f (target <= 1.25)", times["P-LoRA gate"] / times["direct merge"])


if __name__ == "__main__":
    main()

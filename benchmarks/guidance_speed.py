"""Per-step cost of P-LoRA score guidance against plain sampling, side by side in one run.

An SD1.5-shaped UNet, the full-size SD VAE, a TAESD decoder, a CLIP ViT-B/32 and a DINO
ViT-S/16 (all random weights, built locally: nothing is downloaded). Variants: plain
sampling; fast mode with the VAE (full-resolution decode, and decoded at 256 px); fast mode
with TAESD; exact mode with TAESD, interleaved
over the repeats (the fastest run of each counts). Prints seconds per step, the ratio to plain,
and peak memory (CUDA: peak allocated per variant; CPU: the process's peak resident set).

    python benchmarks/guidance_speed.py               # 64x64 latent (512x512 px), CUDA if present
    python benchmarks/guidance_speed.py --latent 32   # 256x256, quicker on a CPU
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_speed import build_unet, load_pack, use_comfyui_checkout  # noqa: E402

logger = logging.getLogger("plora.benchmark")
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def build_vaes():
    import comfy.sd
    import comfy.taesd.taesd

    import comfy.ldm.models.autoencoder

    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    randomise(autoencoder, 1)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict())  # detected as the SD VAE, as a real file would be
    taesd = comfy.taesd.taesd.TAESD()
    randomise(taesd, 2, 0.05)
    return vae, comfy.sd.VAE(sd=taesd.state_dict())


def build_encoders(device, dtype):
    import open_clip
    from transformers import ViTConfig, ViTModel

    from plora_pack.plora_core.encoders import DinoImageEncoder, OpenClipImageEncoder

    # the image tower only, as load_open_clip_encoder gives it (the whole CLIP model returns a tuple)
    clip_model = open_clip.create_model("ViT-B-32").visual.to(device, dtype).eval().requires_grad_(False)
    clip = OpenClipImageEncoder(clip_model, name="ViT-B-32", image_size=224, mean=open_clip.OPENAI_DATASET_MEAN,
                                std=open_clip.OPENAI_DATASET_STD, device=device, dtype=dtype)
    dino_model = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, patch_size=16, image_size=224), add_pooling_layer=False)
    dino_model = dino_model.to(device, dtype).eval().requires_grad_(False)
    dino = DinoImageEncoder(dino_model, interpolate_pos_encoding=False, name="dino-vits16", image_size=224,
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), device=device, dtype=dtype)
    return clip, dino


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the fastest counts")
    parser.add_argument("--skip", action="append", default=[], metavar="VARIANT",
                        help="leave a variant out, e.g. --skip exact (its activations need much memory on a CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("plora").setLevel(logging.WARNING)  # no per-run guidance log in the timings
    logger.setLevel(logging.INFO)

    use_comfyui_checkout()
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    load_pack()
    import comfy.model_management as mm

    device = mm.get_torch_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_unet(device.type, dtype)
    vae, taesd = build_vaes()
    clip, dino = build_encoders(device, dtype)
    from plora_pack.nodes.guidance_sampler_node import PosteriorMetricGuidanceSampler

    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    subject = torch.rand(1, 512, 512, 3, generator=generator)
    style = torch.rand(1, 512, 512, 3, generator=generator)
    node = PosteriorMetricGuidanceSampler()
    variants = [("plain", 0.0, "fast", None, 0), ("fast + VAE", 10.0, "fast", None, 0),
                ("fast + VAE 256px", 10.0, "fast", None, 256), ("fast + TAESD", 10.0, "fast", taesd, 0),
                ("exact + TAESD", 10.0, "exact", taesd, 0)]
    variants = [v for v in variants if not any(word in v[0] for word in args.skip)]
    def run(steps, m, mode, decoder, decode_size):
        latent = {"samples": torch.zeros(1, 4, args.latent, args.latent)}
        node.sample(model, 0, steps, 7.0, "euler", "normal", positive, negative, latent, 1.0, vae=vae,
                    subject_reference=subject, style_reference=style, clip_encoder=clip, guidance_scale=m,
                    clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0, gradient_mode=mode,
                    guidance_start=0.0, guidance_end=1.0, guide_every=1, dino_encoder=dino, guidance_decoder=decoder,
                    guidance_decode_size=decode_size)

    for _, *settings in variants:  # warm-up: loading, decoder copies, first-call allocations
        run(1, *settings)
    results = {name: (float("inf"), 0.0) for name, *_ in variants}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
        for name, *settings in variants:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run(args.steps, *settings)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / args.steps
            results[name] = (min(results[name][0], seconds), max(results[name][1], peak_memory_mb()))

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    logger.info("SD1.5-shaped UNet, latent %dx%d (%dx%d px), CFG, CLIP ViT-B/32 + DINO ViT-S/16, %s, %s",
                args.latent, args.latent, 8 * args.latent, 8 * args.latent, dtype, where)
    plain = results["plain"][0]
    for name, (seconds, memory) in results.items():
        peak = f"  peak {memory:.0f} MB allocated" if torch.cuda.is_available() else ""
        logger.info("  %-14s %8.3f s/step  x%.2f of plain%s", name, seconds, seconds / plain, peak)
    if not torch.cuda.is_available():
        logger.info("process peak resident memory over all variants: %.0f MB", peak_memory_mb())
    logger.info("targets: fast+TAESD <= 1.5x, fast+VAE <= 2.5x, exact <= 4x")


if __name__ == "__main__":
    main()

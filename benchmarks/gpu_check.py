"""One prepared GPU check of the gate and guidance (issue 16): one run, one table, at most 8 minutes.

On a CUDA GPU (fp16, nothing downloaded, every model with random weights) it prints one table:

- ComfyUI's own SDXL UNet at 1024x1024 (128x128 latent), batch 1 + CFG (batch 2 per UNet call),
  euler: seconds per sampling step and peak VRAM (torch.cuda.max_memory_allocated, reset per
  variant) for base, direct (two rank-64 kohya LoRAs on the 560 attention projections merged
  into the weights by ComfyUI) and the P-LoRA gate over the same two LoRAs, built as the nodes
  build it (glue.lora_pair.LoraSet, glue.gate.build_gated_model), eager (plora_core.fused_gate
  DISABLED) and fused (the Triton kernels), with gate/direct and the fused launches per step;
- score guidance on the base UNet (glue.guidance_widgets.GuidanceWidgets -> install_guidance ->
  hooks.run, as PosteriorMetricGuidanceSampler runs it; CLIP ViT-B/32 + DINO ViT-S/16): fast
  mode with ComfyUI's TAESD, fast mode with the full SD/SDXL VAE at guidance_decode_size 256, and
  exact mode with TAESD, each as s/step, x of base and peak VRAM;
- per gated-layer call at the SDXL layer shapes of gate_cost.py: the Linear alone, the eager and
  the fused gate in ms (the fastest of several repeats), and the fused kernel's KL (materialised
  and factored deltas) against the eager float64 definition on the device (max relative error).

Each sampling variant runs 1 + `--steps` steps (default 3 timed); the first step (loading,
patching, Triton compilation) is not timed, the median of the others counts (sampler callback
timestamps after a device sync). A variant that would start after the time budget (`--budget`,
default 420 s of the 8 minutes) is skipped with a `skipped` row; one that fails gets a `failed`
row with its error, and the exit code is 1. Every UNet output is checked to be finite.

Refuses without CUDA (exit code 2) unless `--dry-run` (= `--device cpu --tiny`): the same code on
the CPU with a tiny SDXL-shaped UNet (model_channels 32), a tiny VAE, ComfyUI's TAESD, tiny
CLIP/DINO encoders, an 8x8 latent, rank-4 LoRAs and one timed step, fp32, the fused gate under
Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported) where Triton is
installed. Needs a ComfyUI checkout (COMFYUI_PATH, or /work/shared/comfyui).

    python benchmarks/gpu_check.py              # on a CUDA machine (not yet run on one)
    python benchmarks/gpu_check.py --dry-run    # tiny shapes on the CPU (about a minute)
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:  # Triton reads it when it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gate_cost import (  # noqa: E402
    ADM_WIDTH, ATTENTION, BATCH, SDXL_UNET, SHOWN, TEXT_TOKENS, TEXT_WIDTH, TINY, LayerShape, fused_module,
    gate_path, make_gate, patched, use_comfyui,
)

logger = logging.getLogger("plora.benchmark")

HARD_LIMIT_SECONDS = 480  # the limit for the whole run on one H100/H200
FULL = {"latent": 128, "rank": 64, "steps": 3, "decode_size": 256, "reference": 512}
DRY = {"latent": 8, "rank": 4, "steps": 1, "decode_size": 32, "reference": 64}
TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # x8, as SD's


class Budget:
    """Seconds since the start, against the budget; `allows` whether a part of about `seconds` still fits."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float) -> bool:
        return self.spent() + seconds <= self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------- per gated-layer call (plora_core alone)

def kl_float64(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """KL(softmax(F + D) || softmax(F)) per sample by its definition, in float64 (the oracle)."""
    log_q = torch.log_softmax(base.double(), dim=-1)
    log_p = torch.log_softmax(base.double() + delta.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).reshape(base.shape[0], -1).mean(1)


def seconds(call, device: torch.device, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def fused_runs_on(module, device: torch.device) -> bool:
    """Whether `module` (a plora_core.fused_gate) can run its kernels on `device` (CPU: Triton's interpreter)."""
    if module is None or module._kernels() is None:
        return False
    if device.type == "cpu":
        with patched(module, "FORCE", True):
            return module.fused_available(torch.empty(1))
    return module.fused_available(torch.empty(1, device=device))


@contextlib.contextmanager
def fused_path(module, fused: bool, device: torch.device):
    """The eager gate (DISABLED) or the fused one (FORCE'd on the CPU, as is on an accelerator)."""
    flag = ("FORCE" if device.type == "cpu" else None) if fused else "DISABLED"
    with patched(module, flag, True) if flag else contextlib.nullcontext():
        yield


def relative_error(divergences: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((divergences.double() - reference).abs() / reference.abs().clamp_min(1e-30)).max())


def check_shape(label: str, shape: LayerShape, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype)
    gate = make_gate(shape, 2, rank=RANK_OF[device.type == "cpu"])
    x = torch.randn(BATCH, shape.tokens, shape.in_features, device=device).to(dtype)
    module = fused_module()
    fused = fused_runs_on(module, device)
    row = {"shape": label}
    with torch.inference_mode():
        row["linear_ms"] = seconds(lambda: linear(x), device, repeats) * 1e3
        for path, on in (("eager", False), ("fused", True)):
            if on and not fused:
                continue
            with gate_path(on):
                gate.forward(linear, x)
                row[f"{path}_ms"] = seconds(lambda: gate.forward(linear, x), device, repeats) * 1e3
        if fused:
            with fused_path(module, True, device):
                base = linear(x)
                deltas = gate.deltas(x, stacked=True)
                reference = torch.stack([kl_float64(base, d) for d in deltas])
                _, _, materialised = module.gate(base, deltas, "kl")
                _, _, factored = module.gate_factored(base, *gate.deltas.factors_for_kernels(x), "kl")
                row["fused_kl_max_rel_error"] = max(relative_error(materialised, reference),
                                                    relative_error(factored, reference))
    return row


RANK_OF = {False: FULL["rank"], True: DRY["rank"]}


# ---------------------------------------------------------------- ComfyUI: models and LoRAs

def initialise(module: torch.nn.Module, seed: int) -> None:
    """Random weights that keep activations finite in fp16: normal / sqrt(fan in) for every weight matrix and
    kernel, norms' scales 1, biases 0 (ComfyUI's ops leave parameters uninitialised). Drawn on the
    parameters' own device (the SDXL UNet's 2.6 G parameters in a second on a GPU)."""
    generators = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, 1.0 / math.sqrt(math.prod(param.shape[1:])), generator=generators[param.device])
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def build_sdxl(device: torch.device, dtype: torch.dtype, tiny: bool):
    """ComfyUI's SDXL model class (the full UNet, or the tiny SDXL-shaped one of the host tests) in a ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if tiny:
        from support.host_support import SDXL_TINY_UNET
        config = dict(SDXL_TINY_UNET)
    else:
        config = dict(SDXL_UNET, dtype=dtype)
    model = comfy.supported_models.SDXL(config).get_model({}, device=device)
    initialise(model.diffusion_model, 0)
    model.diffusion_model.to(dtype)
    model.diffusion_model.dtype = dtype
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def sdxl_conditioning(tiny: bool, seed: int):
    width, pooled = (32, 32) if tiny else (TEXT_WIDTH, ADM_WIDTH - 6 * 256)
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TEXT_TOKENS, width, generator=generator),
             {"pooled_output": torch.randn(1, pooled, generator=generator)}]]


def attention_layers(model_patcher) -> dict[str, torch.Size]:
    """{module path under diffusion_model: weight shape} of every attention projection (560 in SDXL)."""
    return {name: module.weight.shape for name, module in model_patcher.model.diffusion_model.named_modules()
            if name.endswith(ATTENTION) and isinstance(module, torch.nn.Linear)}


def write_kohya_lora(file: Path, layers: dict, rank: int, seed: int) -> Path:
    """A kohya-format LoRA (lora_unet_*.lora_down/up.weight, .alpha = rank), fp16, its delta about 0.1 x the
    layer's output for unit inputs (down ~ 1/sqrt(in), up ~ 0.1/sqrt(rank))."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        up = torch.randn(out_features, rank, generator=generator) * (0.1 / math.sqrt(rank))
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(file))
    return file


def build_encoders(device: torch.device, dtype: torch.dtype, tiny: bool, folder: str):
    """CLIP ViT-B/32 and DINO ViT-S/16 (tiny ones for the dry run) as the pack's encoders, random weights."""
    import open_clip
    from transformers import ViTConfig, ViTModel

    from plora_pack.plora_core.encoders import DinoImageEncoder, OpenClipImageEncoder

    if tiny:
        from support.tiny_encoders import register_tiny_clip_arch
        architecture, size = register_tiny_clip_arch(folder), 32
        dino_config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                patch_size=8, image_size=32)
    else:
        architecture, size = "ViT-B-32", 224
        dino_config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                intermediate_size=1536, patch_size=16, image_size=224)
    torch.manual_seed(3)
    visual = open_clip.create_model(architecture).visual.to(device, dtype).eval().requires_grad_(False)
    clip = OpenClipImageEncoder(visual, name=architecture, image_size=size, mean=open_clip.OPENAI_DATASET_MEAN,
                                std=open_clip.OPENAI_DATASET_STD, device=device, dtype=dtype)
    dino_model = ViTModel(dino_config, add_pooling_layer=False).to(device, dtype).eval().requires_grad_(False)
    dino = DinoImageEncoder(dino_model, interpolate_pos_encoding=False, name="dino", image_size=size,
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), device=device, dtype=dtype)
    return clip, dino


def build_decoders(tiny: bool):
    """(the full SD/SDXL VAE, or a tiny x8 one; ComfyUI's TAESD), random weights, as ComfyUI VAE objects loaded
    from their state dicts (the full VAE detected by its keys, as a real file is)."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    import comfy.taesd.taesd

    from guidance_speed import SD_VAE

    config = TINY_VAE if tiny else SD_VAE
    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=config, embed_dim=4)
    initialise(autoencoder, 1)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(),
                       config={"params": {"ddconfig": config, "embed_dim": 4}} if tiny else None)
    taesd = comfy.taesd.taesd.TAESD()
    initialise(taesd, 2)
    return vae, comfy.sd.VAE(sd=taesd.state_dict())


# ---------------------------------------------------------------- sampling

def sample_steps(model_patcher, steps: int, latent: int, positive, negative, device: torch.device,
                 guidance=None, counter=None) -> tuple[list[float], bool, list]:
    """(seconds of each step after the first, output finite, `counter()` at each step's end) of one euler run
    over `steps` + 1 steps, CFG 7.

    `guidance`: (hooks, sampler model) of install_guidance, run as PosteriorMetricGuidanceSampler runs it.
    """
    import comfy.sample

    from plora_pack.glue import host

    stamps, counts = [], []

    def on_step(*args):
        sync(device)
        stamps.append(time.perf_counter())
        counts.append(counter() if counter else None)

    zeros = torch.zeros(1, 4, latent, latent)
    noise = comfy.sample.prepare_noise(zeros, 0)
    total = steps + 1
    with contextlib.ExitStack() as stack:
        if guidance is not None:
            hooks, model_patcher = guidance
            sigmas = host.schedule_sigmas(model_patcher, total, "euler", "normal", 1.0)
            stack.enter_context(hooks.run(model_patcher, sigmas, "euler", 7.0))
        out = comfy.sample.sample(model_patcher, noise, total, 7.0, "euler", "normal", positive, negative, zeros,
                                  seed=0, callback=on_step, disable_pbar=True)
    return [b - a for a, b in zip(stamps, stamps[1:])], bool(torch.isfinite(out).all()), counts


class Launches:
    """Counts the fused gate's Triton launches (plora_core.fused_gate.launch) while installed."""

    def __init__(self, module):
        self.module, self.count = module, 0

    def __enter__(self):
        original = self.module.launch

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        self.restore = patched(self.module, "launch", counted)
        self.restore.__enter__()
        return self

    def __exit__(self, *exc):
        self.restore.__exit__(*exc)


def measure(rows: list, budget: Budget, section: str, name: str, estimate: float, device: torch.device, run) -> None:
    """Run one variant (`run()` -> (step seconds, finite, note)) unless the budget is spent; append its row."""
    row = {"section": section, "name": name}
    rows.append(row)
    if not budget.allows(estimate):
        row["skipped"] = f"skipped: the time budget ({budget.seconds:.0f} s) would run out (spent " \
                         f"{budget.spent():.0f} s, this needs about {estimate:.0f} s)"
        logger.info("... %s", row["skipped"])
        return
    logger.info("... %s: %s (at %.0f s)", section, name, budget.spent())
    reset_peak(device)
    try:
        steps, finite, note = run()
    except Exception as error:  # one failing variant must not cost the rest of the run
        traceback.print_exc()
        row["failed"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        return
    row.update(seconds=statistics.median(steps), peak_mb=peak_mb(device), finite=finite, note=note)


def unet_rows(rows, budget, device, dtype, tiny, settings, folder) -> tuple[object, float | None]:
    """base, direct, gate eager, gate fused rows; returns (the base ModelPatcher, base s/step)."""
    from plora_pack.glue.gate import build_gated_model, gated_layers
    from plora_pack.glue.lora_mapping import map_lora_onto_model
    from plora_pack.plora_core import fused_gate
    from plora_pack.plora_core.lora_file import read_lora_file
    from gate_speed import lora_set

    model = build_sdxl(device, dtype, tiny)
    layers = attention_layers(model)
    files = [write_kohya_lora(Path(folder) / f"{name}.safetensors", layers, settings["rank"], seed)
             for seed, name in enumerate(("subject", "style"), start=1)]
    loras = [read_lora_file(str(file)) for file in files]
    direct = model.clone()
    for lora in loras:
        direct.add_patches(map_lora_onto_model(model, lora).raw_patches, 1.0)
    gated = build_gated_model(model, lora_set(loras))
    section = (f"SDXL UNet {8 * settings['latent']}px, batch 1 + CFG, 2 rank-{settings['rank']} LoRAs on "
               f"{len(layers)} attention projections ({len(gated_layers(gated))} gated)")
    positive, negative = sdxl_conditioning(tiny, 1), sdxl_conditioning(tiny, 2)
    steps, latent = settings["steps"], settings["latent"]
    fused = fused_runs_on(fused_gate, device)
    base_step = [None]

    def estimate(factor: float) -> float:  # seconds a variant needs: its steps and about as long again to set up
        return 2 * (steps + 1) * factor * (base_step[0] or 1.0) + 10

    def plain(patcher):
        def run():
            times, finite, _ = sample_steps(patcher, steps, latent, positive, negative, device)
            return times, finite, ""
        return run

    def gate(on: bool):
        def run():
            if on and not fused:
                raise LookupError("the fused gate cannot run here (no Triton, or no CUDA)")
            with fused_path(fused_gate, on, device), Launches(fused_gate) as launches:
                times, finite, counts = sample_steps(gated, steps, latent, positive, negative, device,
                                                     counter=lambda: launches.count)
            per_step = (counts[-1] - counts[0]) / steps  # the timed steps (context-fed k/v reused)
            if on and not counts[-1]:
                raise RuntimeError("the fused variant launched no Triton kernel")
            if not on and counts[-1]:
                raise RuntimeError(f"the eager variant launched {counts[-1]} Triton kernels")
            return times, finite, f"{per_step:.0f} Triton launches/step" if on else ""
        return run

    measure(rows, budget, section, "base", estimate(1), device, plain(model))
    base_step[0] = rows[-1].get("seconds")
    measure(rows, budget, section, "direct (2 LoRAs merged)", estimate(1.2), device, plain(direct))
    measure(rows, budget, section, "gate eager", estimate(10), device, gate(False))
    if fused:
        measure(rows, budget, section, "gate fused", estimate(3), device, gate(True))
    else:
        rows.append({"section": section, "name": "gate fused",
                     "skipped": "skipped: the fused gate cannot run here (Triton missing, or not on CUDA)"})
    return model, base_step[0]


def guidance_rows(rows, budget, device, dtype, tiny, settings, folder, model, base_step) -> None:
    """fast + TAESD, fast + VAE at guidance_decode_size, exact + TAESD: the pack's guidance on the base UNet."""
    from plora_pack.glue.guidance import install_guidance
    from plora_pack.glue.guidance_widgets import GuidanceWidgets

    vae, taesd = build_decoders(tiny)
    clip, dino = build_encoders(device, dtype, tiny, folder)
    generator = torch.Generator().manual_seed(4)
    side = settings["reference"]
    subject, style = (torch.rand(1, side, side, 3, generator=generator) for _ in range(2))
    positive, negative = sdxl_conditioning(tiny, 1), sdxl_conditioning(tiny, 2)
    steps, latent = settings["steps"], settings["latent"]
    encoders = "tiny CLIP + DINO" if tiny else "CLIP ViT-B/32 + DINO ViT-S/16, full VAE = SD/SDXL AutoencoderKL"
    section = f"score guidance on the base UNet, every step, {encoders}"

    def guided(mode: str, decoder, decode_size: int):
        def run():
            widgets = GuidanceWidgets(vae=vae, subject_reference=subject, style_reference=style, clip_encoder=clip,
                                      guidance_scale=10.0, clip_subject_weight=1.0, clip_style_weight=1.0,
                                      dino_style_weight=1.0, gradient_mode=mode, guidance_start=0.0,
                                      guidance_end=1.0, guide_every=1, dino_encoder=dino, guidance_decoder=decoder,
                                      guidance_decode_size=decode_size)
            patcher, hooks = install_guidance(model, widgets.settings(model), at_run_time=False)
            times, finite, _ = sample_steps(patcher, steps, latent, positive, negative, device, (hooks, patcher))
            return times, finite, ""
        return run

    def estimate(factor: float) -> float:
        return 2 * (steps + 1) * factor * (base_step or 1.0) + 15

    size = settings["decode_size"]
    measure(rows, budget, section, "fast + TAESD", estimate(2), device, guided("fast", taesd, 0))
    measure(rows, budget, section, f"fast + VAE, decode size {size}", estimate(3), device, guided("fast", vae, size))
    measure(rows, budget, section, "exact + TAESD", estimate(5), device, guided("exact", taesd, 0))


# ---------------------------------------------------------------- the table

def cell(value, form: str, width: int) -> str:
    return f"{'-' if value is None else form.format(value):>{width}}"


def report(rows: list, layers: list, where: str, dtype: torch.dtype, budget: Budget, tiny: bool) -> None:
    logger.info("")
    logger.info("P-LoRA GPU check (issue 16): %s, %s, torch %s%s", where, str(dtype).replace("torch.", ""),
                torch.__version__, ", tiny shapes (dry run)" if tiny else "")
    logger.info("%-40s%10s%9s%9s%11s  %s", "variant", "s/step", "x base", "x direct", "peak MB", "note")
    by_name = {row["name"]: row for row in rows}
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            logger.info("%s", section)
        label = f"  {row['name']}"
        if "seconds" not in row:
            logger.info("%-40s%s", label, row.get("skipped") or row.get("failed"))
            continue
        base = by_name.get("base", {}).get("seconds")
        direct = by_name.get("direct (2 LoRAs merged)", {}).get("seconds")
        versus_direct = row["seconds"] / direct if direct and row["name"].startswith("gate") else None
        note = ", ".join(part for part in (row["note"], "" if row["finite"] else "OUTPUT NOT FINITE") if part)
        line = (f"{label:<40}{cell(row['seconds'], '{:.3f}', 10)}"
                f"{cell(row['seconds'] / base if base else None, '{:.2f}', 9)}{cell(versus_direct, '{:.2f}', 9)}"
                f"{cell(row['peak_mb'], '{:.0f}', 11)}  {note}")
        logger.info("%s", line.rstrip())
    logger.info("per gated-layer call, fp16, batch 2, two rank-%d LoRAs (ms, fastest of the repeats)",
                RANK_OF[tiny])
    logger.info("  %-42s%10s%10s%10s%10s%14s", "shape", "Linear", "eager", "fused", "fused/eag", "fused KL err")
    for row in layers:
        if "failed" in row:
            logger.info("  %-42s%s", row["shape"], row["failed"])
            continue
        fused = row.get("fused_ms")
        logger.info("  %-42s%s%s%s%s%s", row["shape"], cell(row["linear_ms"], "{:.3f}", 10),
                    cell(row["eager_ms"], "{:.3f}", 10), cell(fused, "{:.3f}", 10),
                    cell(fused / row["eager_ms"] if fused else None, "{:.2f}", 10),
                    cell(row.get("fused_kl_max_rel_error"), "{:.2e}", 14))
    errors = [row["fused_kl_max_rel_error"] for row in layers if "fused_kl_max_rel_error" in row]
    logger.info("fused KL vs float64 (materialised and factored deltas): %s",
                f"max relative error {max(errors):.2e} over {len(errors)} shapes" if errors
                else "not checked (the fused gate cannot run here)")
    logger.info("total: %.0f s (budget %.0f s, limit %d s)", budget.spent(), budget.seconds, HARD_LIMIT_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU check of this script)")
    parser.add_argument("--repeats", type=int, default=10, help="per-layer timing repeats (the fastest counts)")
    parser.add_argument("--steps", type=int, default=None, help="timed sampling steps per variant (+1 untimed)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds; a variant that would end after it is skipped (default 420 of the 8 minutes)")
    parser.add_argument("--skip", action="append", default=[], choices=["layers", "unet", "guidance"],
                        help="leave a part out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("plora").setLevel(logging.WARNING)  # no per-run gate/guidance logs between the rows
    logger.setLevel(logging.INFO)
    if args.dry_run:
        args.device, args.tiny, args.repeats = "cpu", True, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.error("gpu_check.py needs a CUDA GPU (none found); run `--dry-run` to check it on the CPU.")
        return 2
    budget = Budget(min(args.budget, HARD_LIMIT_SECONDS))
    device = torch.device(args.device)
    settings = dict(DRY if args.tiny else FULL)
    if args.steps:
        settings["steps"] = args.steps
    dtype = torch.float32 if device.type == "cpu" else torch.float16

    layers = []
    if "layers" not in args.skip:
        shapes = {"tiny": TINY} if args.tiny else SHOWN
        for label, shape in shapes.items():
            if shape.context_fed:
                continue
            try:
                layers.append(check_shape(label, shape, device, torch.float16, args.repeats))
            except Exception as error:
                traceback.print_exc()
                layers.append({"shape": label, "failed": f"failed: {type(error).__name__}: {error}"[:200]})

    rows = []
    if {"unet", "guidance"} - set(args.skip):
        use_comfyui()
        import comfy.cli_args

        comfy.cli_args.args.cpu = device.type == "cpu"
        sys.path.insert(0, str(HERE.parent / "tests"))  # support.host_support / tiny_encoders (tiny shapes)
        from gate_speed import load_pack

        load_pack()
        with tempfile.TemporaryDirectory() as folder:
            model, base_step = None, None
            if "unet" not in args.skip:
                model, base_step = unet_rows(rows, budget, device, dtype, args.tiny, settings, folder)
            if "guidance" not in args.skip:
                if model is None:
                    model = build_sdxl(device, dtype, args.tiny)
                guidance_rows(rows, budget, device, dtype, args.tiny, settings, folder, model, base_step)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report(rows, layers, where, dtype, budget, args.tiny)
    failed = [row for row in rows + layers if "failed" in row]
    unfinite = [row for row in rows if row.get("finite") is False]
    return 1 if failed or unfinite else 0


if __name__ == "__main__":
    raise SystemExit(main())

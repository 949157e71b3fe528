"""Per-step cost of the P-LoRA gate against the base model and a direct merge, side by side in one run.

Builds an SD1.5-shaped UNet with ComfyUI (random weights), writes two rank-64 kohya
LoRAs on every attention, feed-forward and projection layer of its transformers, and
times sampling steps for: the base model; both LoRAs merged directly (two LoraLoaders);
the P-LoRA gate; the same gate with a straightforward divergence (both outputs F + D_c and
F + D_s materialised, KL by its definition in float32 via log_softmax), installed the way
the pack installs its own, so only the divergence and selection maths differ; and the same gate
with the decision left out ("deltas only": every gated layer computes the LoRAs' deltas and adds
LoRA 0's, no divergence), the floor any divergence implementation sits on. Prints seconds per
step and the ratios gate/base, gate/direct and gate/straightforward, deltas-only/direct, and the
decision's share of a direct-merge step.

`--loras 2,3,4` measures sets of N LoRAs in one run (N rank-64 LoRAs on the same layers, the set
built as the nodes build it: Load Subject + Style LoRA's pair, then Add LoRA to Set with roles
alternating subject, style): for each N the base (timed once), all N merged directly and the gate
choosing among N, with gate/base and gate/direct. The straightforward variant compares a pair, so
it runs for N = 2 only.

Only sampling steps are timed (sampler callback timestamps, the first step left out:
it includes loading and patching the model), interleaved over the repeats (the fastest
run of each variant counts). On Linux, freed memory is kept by the process (glibc
`mallopt`), so that no variant pays page faults for memory the allocator handed back to
the OS: otherwise each step of a variant can fault in gigabytes of activations or not,
depending only on what was allocated before (the per-step page faults are printed;
`--allocator default` measures with them).

    python benchmarks/gate_speed.py                 # 64x64 latent (512x512), CUDA if present
    python benchmarks/gate_speed.py --latent 32     # 256x256, quicker on a CPU
    python benchmarks/gate_speed.py --loras 2,3,4   # sets of 2, 3 and 4 LoRAs side by side
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.util
import logging
import resource
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
TARGET_GATE_OVER_DIRECT = 1.15  # issue 16, at --latent 64
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def use_comfyui_checkout() -> None:
    """Measure against the ComfyUI checkout of COMFYUI_PATH (or the one the pack is installed in)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.comfyui_checkout import bind_checkout_packages, find_checkout

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


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never return freed memory to the OS."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    # mallopt takes an int: -1 becomes SIZE_MAX, a trim threshold never reached
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


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


def first_lora_without_decision(name, base: torch.Tensor, deltas) -> torch.Tensor:
    """A choice that costs nothing: LoRA 0 for every sample (the "deltas only" variant's rule)."""
    return torch.zeros(base.shape[0], dtype=torch.long, device=base.device)


def straightforward_gate_deltas(base: torch.Tensor, subject_delta: torch.Tensor, style_delta: torch.Tensor,
                                criterion: str = "kl", style_bias: float = 1.0,
                                channel_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate written the obvious way: F + D_c and F + D_s formed, KL(softmax(F_hat) || softmax(F)) by its
    definition in float32 with log_softmax, the chosen output selected (KL only; same signature as the pack's)."""
    subject_out, style_out = base + subject_delta, base + style_delta
    log_q = torch.log_softmax(base.float(), dim=channel_dim)

    def kl(tuned: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(tuned.float(), dim=channel_dim)
        per_token = (log_p.exp() * (log_p - log_q)).sum(dim=channel_dim)
        return per_token.reshape(per_token.shape[0], -1).mean(dim=1)

    subject_mask = kl(subject_out) >= style_bias * kl(style_out)
    mask = subject_mask.reshape(-1, *([1] * (base.ndim - 1)))
    return torch.where(mask, subject_out, style_out), subject_mask


def seconds_per_step(model_patcher, steps: int, latent: int) -> tuple[float, float]:
    """(fastest step, page faults per step) of one sampling run, the first step (loading, patching) left out."""
    import comfy.sample

    shape = (1, 4, latent, latent)
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    stamps, faults = [], []

    def on_step(step, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    zeros = torch.zeros(shape)
    comfy.sample.sample(model_patcher, comfy.sample.prepare_noise(zeros, 0), steps, 7.0, "euler", "normal",
                        positive, negative, zeros, seed=0, callback=on_step, disable_pbar=True)
    fastest = min(b - a for a, b in zip(stamps, stamps[1:]))
    return fastest, (faults[-1] - faults[0]) / (len(faults) - 1)


class InstalledGate:
    """Runs a variant whose gated layers decide with `gate_deltas` (the pack's own LayerGate when None).

    The replacement takes the eager path's place (`LayerGate._gated`: materialised deltas in, output and
    per-sample choices out) and turns the fused kernels off, so it is measured on every device.
    `first_lora_without_decision` keeps the eager gate and only replaces its choice."""

    def __init__(self, gate_deltas=None):
        from plora_pack.plora_core.gate import LayerGate

        self.layer_gate = LayerGate
        self.replacement = gate_deltas

    def __enter__(self):
        self.original = (self.layer_gate._gated, self.layer_gate._fusable)
        replacement, eager = self.replacement, self.original[0]
        if replacement is first_lora_without_decision:  # the eager gate with a free decision
            self.layer_gate._gated = lambda gate, base, deltas, choose: eager(gate, base, deltas, replacement)
            self.layer_gate._fusable = lambda gate, base: False
        elif replacement is not None:
            def _gated(gate, base, deltas, choose):
                if gate.row_slices or len(deltas) != 2:  # a pair on whole layers (SD1.5 has no fused ones)
                    return eager(gate, base, deltas, choose)
                out, subject = replacement(base, deltas[0], deltas[1], gate.rule.criterion, gate.rule.style_bias,
                                           gate.channel_dim)
                return out, [(gate.layer, (~subject).long())]  # the LoRA index: 0 subject, 1 style
            self.layer_gate._gated = _gated
            self.layer_gate._fusable = lambda gate, base: False

    def __exit__(self, *exc):
        self.layer_gate._gated, self.layer_gate._fusable = self.original


def lora_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 2 or n > 8 for n in counts):
        raise argparse.ArgumentTypeError(f"--loras {text!r}: a comma list of set sizes from 2 to 8, e.g. 2,3,4")
    return list(dict.fromkeys(counts))


def lora_set(files: list):
    """The set as the nodes build it: the pair (Load Subject + Style LoRA), then one Add LoRA to Set per file."""
    from plora_pack.glue.lora_pair import LoraChoice, LoraSet

    loras = LoraSet.pair(LoraChoice(files[0], 1.0), LoraChoice(files[1], 1.0))
    for index, file in enumerate(files[2:]):
        loras = loras.with_lora(LoraChoice(file, 1.0, ("subject", "style")[index % 2], 1.0))
    return loras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--steps", type=int, default=5, help="sampling steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: the process keeps freed memory (no page-fault churn); default: glibc as is")
    parser.add_argument("--flush-denormal", action="store_true", help="flush denormal floats to zero on the CPU")
    parser.add_argument("--skip", action="append", default=[], metavar="VARIANT",
                        help="leave a variant out, e.g. --skip straightforward")
    parser.add_argument("--loras", type=lora_counts, default=[2], metavar="N[,N...]",
                        help="set sizes to measure, e.g. 2,3,4 (default 2: the paper's pair)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    kept = args.allocator == "keep" and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    use_comfyui_checkout()
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    load_pack()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if torch.cuda.is_available() else "fp32")]
    model = build_unet("cuda" if torch.cuda.is_available() else "cpu", dtype)

    from plora_pack.glue.gate import build_gated_model, gated_layers
    from plora_pack.glue.lora_mapping import map_lora_onto_model
    from plora_pack.plora_core.lora_file import read_lora_file

    with tempfile.TemporaryDirectory() as folder:
        names = ["subject", "style", *(f"lora{k}" for k in range(3, max(args.loras) + 1))]
        files = [Path(folder) / f"{name}.safetensors" for name in names]
        for seed, file in enumerate(files):
            write_lora(model, file, args.rank, seed)
        loras = [read_lora_file(str(f)) for f in files]
        variants, gated_count = [("base", None, model, None)], {}
        for count in args.loras:
            direct = model.clone()
            for lora in loras[:count]:
                direct.add_patches(map_lora_onto_model(model, lora).raw_patches, 1.0)
            gated = build_gated_model(model, lora_set(loras[:count]))
            gated_count[count] = len(gated_layers(gated))
            variants += [("direct merge", count, direct, None), ("P-LoRA gate", count, gated, None),
                         ("deltas only", count, gated, first_lora_without_decision)]
            if count == 2:
                variants.append(("straightforward", count, gated, straightforward_gate_deltas))
        variants = [v for v in variants if not any(word in v[0] for word in args.skip)]
        times = {(name, count): float("inf") for name, count, *_ in variants}
        faults = {(name, count): 0.0 for name, count, *_ in variants}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
            for name, count, patcher, gate_deltas in variants:
                with InstalledGate(gate_deltas):
                    seconds, step_faults = seconds_per_step(patcher, args.steps, args.latent)
                if seconds < times[(name, count)]:
                    times[(name, count)], faults[(name, count)] = seconds, step_faults

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    logger.info("SD1.5-shaped UNet, latent %dx%d (%dx%d px), batch 1 + CFG, rank-%d LoRAs, %d gated layers, %s, %s, "
                "allocator %s%s", args.latent, args.latent, 8 * args.latent, 8 * args.latent, args.rank,
                gated_count[args.loras[0]], dtype, device, "keeps freed memory" if kept else "default",
                ", denormals flushed" if args.flush_denormal else "")
    from plora_pack.plora_core.fused_gate import fused_available

    fused = fused_available(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu"))
    for count in args.loras:
        report(times, faults, count, gated_count[count] if len(args.loras) > 1 else None, fused)


def report(times: dict, faults: dict, count: int, gated: int | None, fused: bool = False) -> None:
    """One set size's lines (for a single size, without its heading: the output of the pair-only benchmark).

    With `fused` (the gate ran the fused kernels), "deltas only" is still the eager path's, so gate minus it
    is not the decision's cost and is not printed."""
    if gated is not None:
        logger.info("%d LoRAs (%d gated layers):", count, gated)
    rows = {name: times[(name, n)] for name, n in times if n in (None, count)}
    for name, seconds in rows.items():
        logger.info("  %-16s %8.3f s/step  %9.0f page faults/step", name, seconds,
                    faults[(name, None if name == "base" else count)])
    gate, direct, floor = rows.get("P-LoRA gate"), rows.get("direct merge"), rows.get("deltas only")
    for other in ("base", "direct merge", "straightforward"):
        if gate is not None and other in rows:
            logger.info("ratio gate/%s per step: %.3f%s", other.split()[0], gate / rows[other],
                        f" (target <= {TARGET_GATE_OVER_DIRECT})" if other == "direct merge" else "")
    if "base" in rows and direct is not None:
        logger.info("ratio direct/base per step: %.3f", direct / rows["base"])
    if floor is not None and direct is not None:
        logger.info("ratio deltas-only/direct per step: %.3f (the deltas and the add, no decision: the floor "
                    "under any divergence code)", floor / direct)
        if gate is not None and not fused:
            logger.info("the decision's share of a direct-merge step: %.3f", (gate - floor) / direct)
        elif gate is not None:
            logger.info("(deltas only runs the eager path; the gate ran the fused kernels: no decision share)")


if __name__ == "__main__":
    main()

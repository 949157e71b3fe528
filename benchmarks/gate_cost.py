"""What the P-LoRA gate costs per gated layer on a GPU, counted on any machine (issue 16).

The pack's own `LayerGate.forward` (plora_core/gate.py) runs one gated Linear at each SDXL
1024x1024 layer shape (fp16, batch 2 for CFG, two rank-64 `LowRankPart` LoRAs) on the meta
device, where the gate takes its accelerator branch and nothing is computed. `CostLog`
(cost_counter.py) counts every aten op as a kernel (views, metadata and allocations not),
with the bytes it reads and writes, and the fused path's Triton launches through
`plora_core.fused_gate.launch`. The layer's own Linear (`original`) is counted apart and left
out of every gate figure. Printed per path (today's eager gate, the fused gate):

- kernels per gated-layer call, and bytes moved per element of the layer's output;
- peak extra memory: the largest sum of live storages the gate created (its output included),
  per output element (storages tracked from creation to their finaliser, see cost_counter.py);
- host µs per gated-layer call: the same accelerator op sequence on tiny CPU tensors (every
  tensor reports `is_cpu` False, so every `is_cpu` test in the pack takes its accelerator
  branch; Triton launches are no-ops), minus the Linear alone: Python and dispatcher cost,
  before any CUDA launch cost (a Triton launch adds its own ~10-30 µs of Python);
- gate/base per SDXL step projected for an RTX 4090 and an H100: every kernel costs
  max(bytes / bandwidth, FLOPs / peak) + 5 µs; the base is ComfyUI's own SDXL UNet built on
  meta (batch 2, 128x128 latent, attention as one flash kernel), counted the same way; the
  gate over the 560 attention projections, and over the 722 layers with feed-forward and
  proj_in/proj_out (kohya's default targets), each at the shape ComfyUI's UNet gives it.

    python benchmarks/gate_cost.py              # the tables: eager and fused side by side
    python benchmarks/gate_cost.py --json       # one JSON object {"eager": {...}, "fused": {...}}
    python benchmarks/gate_cost.py --quick      # fewer host-timing calls (what the tests run)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import inspect
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from cost_counter import CostLog, Kernel, attention_as_one_kernel  # noqa: E402

logger = logging.getLogger("plora.benchmark")

BATCH = 2  # batch 1 + CFG, batched as ComfyUI does
RANK = 64
DTYPE = torch.float16
LATENT = 128  # 1024x1024 pixels
TEXT_TOKENS, TEXT_WIDTH, ADM_WIDTH = 77, 2048, 2816
DEFAULT_COMFYUI = "/work/shared/comfyui"
# bandwidth (bytes/s), fp16 tensor peak (FLOP/s)
GPUS = {"rtx4090": (1.0e12, 165e12), "h100": (3.35e12, 990e12)}
LAUNCH_SECONDS = 5e-6
TARGETS = {"kernels_per_layer": 6, "bytes_per_element": 16, "host_us_per_layer": 40, "rtx4090": 1.15, "h100": 1.25}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT_FED = (".attn2.to_k", ".attn2.to_v")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": ADM_WIDTH, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": TEXT_WIDTH,
    "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # comfy/model_detection.py's SDXL


@dataclass(frozen=True)
class LayerShape:
    """A gated Linear: in -> out features over `tokens` tokens per sample.

    `context_fed`: its input is the text context (cross-attention k/v), the same at every step; a
    LayerGate with `static_input` then reuses its output after the first step (counted so).
    """

    in_features: int
    out_features: int
    tokens: int
    context_fed: bool = False

    @property
    def output_elements(self) -> int:
        return BATCH * self.tokens * self.out_features


SHOWN = {
    "attention 640 ch x 4096 tokens": LayerShape(640, 640, 4096),
    "attention 1280 ch x 1024 tokens": LayerShape(1280, 1280, 1024),
    "cross-attn k/v 2048 -> 640, 77 tokens": LayerShape(TEXT_WIDTH, 640, TEXT_TOKENS),
    "cross-attn k/v 2048 -> 1280, 77 tokens": LayerShape(TEXT_WIDTH, 1280, TEXT_TOKENS),
    "  the same, later steps (reused)": LayerShape(TEXT_WIDTH, 1280, TEXT_TOKENS, context_fed=True),
    "ff.net.0 GEGLU 640 -> 5120, 4096 tokens": LayerShape(640, 5120, 4096),
}
HEADLINE = "attention 640 ch x 4096 tokens"
PHASES = ("deltas", "divergence", "choose+add")


@dataclass
class LayerCost:
    """What one gated-layer call launched beyond its Linear, and the memory it held at most.

    `linear`: the Linear's own kernels; `linear_ran`: False where the gate reused an earlier output
    instead of running the Linear (its cost is then saved: `seconds` subtracts it).
    """

    shape: LayerShape
    kernels: list[Kernel]
    linear: list[Kernel]
    linear_ran: bool
    extra_peak_bytes: int
    syncs: int

    @property
    def bytes_per_element(self) -> float:
        return sum(k.moved for k in self.kernels) / self.shape.output_elements

    def phase(self, name: str) -> list[Kernel]:
        return [k for k in self.kernels if k.phase == name]

    def seconds(self, gpu: str) -> float:
        """Roofline seconds the gate adds to the base model's step for this layer."""
        saved = 0.0 if self.linear_ran else sum(k.seconds(*GPUS[gpu], LAUNCH_SECONDS) for k in self.linear)
        return sum(k.seconds(*GPUS[gpu], LAUNCH_SECONDS) for k in self.kernels) - saved


@dataclass
class BaseModelCost:
    """ComfyUI's SDXL UNet, one batch-2 call, and how many gated layers of each shape it has."""

    kernels: list[Kernel]
    layers: dict[str, collections.Counter] = field(default_factory=dict)  # "attention"/"feed-forward" -> shapes

    def seconds(self, gpu: str) -> float:
        return sum(k.seconds(*GPUS[gpu], LAUNCH_SECONDS) for k in self.kernels)


@contextlib.contextmanager
def patched(owner, name: str, value):
    """Set `owner.name = value` for the duration (removed again if `owner` had no own attribute)."""
    had_own = name in vars(owner)
    previous = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


# ---------------------------------------------------------------- the pack and ComfyUI

def import_core():
    """The pack's plora_core (torch only), importable as `plora_core` from the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("plora_core.gate"), importlib.import_module("plora_core.deltas")


def fused_module():
    """plora_core.fused_gate, or None while the pack has no fused gate."""
    import_core()
    try:
        return importlib.import_module("plora_core.fused_gate")
    except ModuleNotFoundError as error:
        if error.name != "plora_core.fused_gate":
            raise
        return None


def use_comfyui() -> None:
    """Bind the ComfyUI checkout (COMFYUI_PATH, the ComfyUI this pack sits in, or /work/shared/comfyui)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.comfyui_checkout import bind_checkout_packages, find_checkout

    checkout = find_checkout() or (DEFAULT_COMFYUI if Path(DEFAULT_COMFYUI, "comfy").is_dir() else None)
    if checkout is None:
        raise SystemExit("gate_cost.py counts the base SDXL UNet with ComfyUI's own code: set COMFYUI_PATH to a "
                         "ComfyUI checkout (v0.3.64 or newer).")
    bind_checkout_packages(checkout)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()


def gate_parameters() -> set[str]:
    gate, _ = import_core()
    return set(inspect.signature(gate.LayerGate.__init__).parameters)


def max_loras() -> int:
    """How many LoRAs `LayerGate` can gate at once (2: subject and style, unless it takes a sequence)."""
    gate, _ = import_core()
    parameters = inspect.signature(gate.LayerGate.__init__).parameters
    return 16 if "deltas" in parameters else 2


def make_gate(shape: LayerShape, loras: int, rank: int = RANK, seed: int = 0):
    """A LayerGate over `loras` random low-rank deltas of a Linear of this shape (x on `device`).

    A context-fed shape gets `static_input=True` (as glue/gate.py gives cross-attention k/v) where the
    gate has it; its state then takes every input as the one seen before (the comparison that decides
    this runs once per model call, not per layer).
    """
    gate, deltas = import_core()
    from plora_core.recorder import GateState

    generator = torch.Generator().manual_seed(seed)
    geometry = deltas.LayerGeometry("linear", shape.out_features, shape.in_features)

    def factor(*size):  # on the CPU, as the pack keeps them; the first call casts them to x's device
        return torch.randn(size, generator=generator) * 0.05

    parts = [deltas.LayerDelta(geometry, [deltas.LowRankPart(factor(shape.out_features, rank),
                                                             factor(rank, shape.in_features), 1.0)])
             for _ in range(loras)]
    static = {"static_input": True} if shape.context_fed and "static_input" in gate_parameters() else {}
    state = GateState()
    if static:
        state.static_inputs.key = lambda x: 0
    if loras == 2:
        return gate.LayerGate("layer", parts[0], parts[1], state, **static)
    return gate.LayerGate("layer", deltas=parts, state=state, **static)


@contextlib.contextmanager
def gate_path(fused: bool, launch=None):
    """Run the eager gate (fused_available -> False) or the fused one (-> True, launches through `launch`)."""
    module = fused_module()
    if module is None:
        if fused:
            raise LookupError("plora_core/fused_gate.py does not exist in this checkout yet")
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(module, "fused_available", lambda *args, **kwargs: fused))
        if fused and launch is not None:
            stack.enter_context(patched(module, "launch", launch))
        yield


@contextlib.contextmanager
def accelerator_branch_on_cpu():
    """Every tensor reports `is_cpu` False: each `is_cpu` test in the pack (divergence._accelerated,
    add_selected, expm1, log1p) takes its accelerator branch on CPU tensors."""
    with patched(torch.Tensor, "is_cpu", property(lambda self: False)):
        yield


@contextlib.contextmanager
def phases(log: CostLog):
    """Attribute kernels to the deltas (LayerDelta and DeltaStack calls), the divergence (the selection rule;
    the fused parts kernel) and choosing (choose_subject, and whatever else the gate runs:
    forming the output)."""
    gate, deltas = import_core()
    fused = fused_module()
    wrapped = [(deltas.LayerDelta, "__call__", "deltas"), (getattr(deltas, "DeltaStack", None), "__call__", "deltas"),
               (gate.DivergenceRule, "__call__", "divergence"), (gate.DivergenceRule, "choose", "divergence"),
               (gate, "choose_subject", "choose+add"), (gate, "weighted_choice", "choose+add"),
               (gate, "add_chosen", "choose+add"),
               (fused, "shift_parts", "divergence"), (fused, "finish", "divergence"),
               (fused, "token_partials", "divergence"), (fused, "add_chosen", "choose+add"),
               (fused, "choose_and_add", "choose+add")]
    with contextlib.ExitStack() as stack:
        for owner, name, phase in wrapped:
            if owner is not None and hasattr(owner, name):
                stack.enter_context(patched(owner, name, log.phase_wrapper(getattr(owner, name), phase)))
        yield


# ---------------------------------------------------------------- counting

def count_layer(shape: LayerShape, fused: bool, loras: int = 2) -> LayerCost:
    """One gated-layer call at `shape` on the meta device: kernels, bytes and memory beyond the Linear."""
    linear = torch.nn.Linear(shape.in_features, shape.out_features, device="meta", dtype=DTYPE)
    gate = make_gate(shape, loras)
    x = torch.empty(BATCH, shape.tokens, shape.in_features, device="meta", dtype=DTYPE)
    log = CostLog(untracked_phases=("linear",))
    alone = CostLog()
    with torch.inference_mode(), gate_path(fused, log.launch):
        gate.forward(linear, x)  # first call: LoRA factors cast and cached (a context-fed output kept)
        with alone:
            linear(x)
        log.kernels.clear()  # the first call's launches
        log.phase = "choose+add"
        with phases(log), log:
            out = gate.forward(log.phase_wrapper(linear, "linear"), x)
            del out
    kernels = [k for k in log.kernels if k.phase != "linear"]
    return LayerCost(shape, kernels, alone.kernels, bool(log.select("linear")), log.peak, log.syncs)


def kernel_sequence(shape: LayerShape, fused: bool, device: str, loras: int = 2) -> list[str]:
    """Names of the kernels one call launches (to check that the host timing runs the accelerator's ops)."""
    linear = torch.nn.Linear(shape.in_features, shape.out_features, device=device, dtype=DTYPE)
    gate = make_gate(shape, loras)
    x = torch.randn(BATCH, shape.tokens, shape.in_features).to(device, DTYPE)
    log = CostLog()
    with torch.inference_mode(), gate_path(fused, log.launch):
        gate.forward(linear, x)
        log.kernels.clear()
        with log:
            gate.forward(linear, x)
    return [k.name for k in log.kernels]


TINY = LayerShape(16, 16, 8)


def host_us_per_layer(fused: bool, loras: int = 2, calls: int = 200, repeats: int = 5) -> float:
    """Host µs per gated-layer call: the accelerator op sequence on tiny CPU tensors, minus the Linear."""
    linear = torch.nn.Linear(TINY.in_features, TINY.out_features, dtype=DTYPE)
    gate = make_gate(TINY, loras, rank=4)
    x = torch.randn(BATCH, TINY.tokens, TINY.in_features).to(DTYPE)

    def no_launch(*args, **kwargs):
        return None

    best = {"gate": math.inf, "linear": math.inf}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no thread-pool start per op: what is left is the host's own work
    with torch.inference_mode(), accelerator_branch_on_cpu(), gate_path(fused, no_launch):
        for _ in range(3):
            gate.forward(linear, x)
        for _ in range(repeats):  # interleaved; the fastest repeat of each counts
            start = time.perf_counter()
            for _ in range(calls):
                gate.forward(linear, x)
            best["gate"] = min(best["gate"], (time.perf_counter() - start) / calls)
            start = time.perf_counter()
            for _ in range(calls):
                linear(x)
            best["linear"] = min(best["linear"], (time.perf_counter() - start) / calls)
    torch.set_num_threads(threads)
    return (best["gate"] - best["linear"]) * 1e6


def count_base_unet() -> BaseModelCost:
    """ComfyUI's SDXL UNet on meta, one call at batch 2, 128x128 latent; its gated layers' shapes."""
    use_comfyui()
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(SDXL_UNET, dtype=DTYPE))
    unet = config.get_model({}, device="meta").diffusion_model
    layers = {"attention": collections.Counter(), "feed-forward": collections.Counter()}
    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION + FEED_FORWARD):
            role = "attention" if name.endswith(ATTENTION) else "feed-forward"
            context_fed = name.endswith(CONTEXT_FED)

            def hook(module, inputs, role=role, context_fed=context_fed):
                shape = LayerShape(module.in_features, module.out_features, math.prod(inputs[0].shape[1:-1]),
                                   context_fed)
                layers[role][shape] += 1
            hooks.append(module.register_forward_pre_hook(hook))
    log = CostLog()

    def meta(*shape, dtype=DTYPE):
        return torch.empty(shape, device="meta", dtype=dtype)

    with (patched(attention, "optimized_attention", attention.attention_pytorch),
          patched(comfy.ops, "scaled_dot_product_attention", attention_as_one_kernel(log)),
          torch.inference_mode(), log):
        unet(meta(BATCH, 4, LATENT, LATENT), meta(BATCH, dtype=torch.float32),
             context=meta(BATCH, TEXT_TOKENS, TEXT_WIDTH), y=meta(BATCH, ADM_WIDTH))
    for handle in hooks:
        handle.remove()
    return BaseModelCost(log.kernels, layers)


# ---------------------------------------------------------------- one path's figures

def projection(base: BaseModelCost, costs: dict[LayerShape, LayerCost], roles: tuple[str, ...]) -> dict[str, float]:
    """(base + gate over the layers of `roles`) / base, per GPU, per SDXL step (one batch-2 UNet call)."""
    counts = collections.Counter()
    for role in roles:
        counts.update(base.layers[role])
    ratios = {}
    for gpu in GPUS:
        base_seconds = base.seconds(gpu)
        gate_seconds = sum(costs[shape].seconds(gpu) * count for shape, count in counts.items())
        ratios[gpu] = (base_seconds + gate_seconds) / base_seconds
    return ratios


def path_figures(base: BaseModelCost, fused: bool, loras: int, quick: bool) -> dict:
    shapes = set(SHOWN.values()) | set(base.layers["attention"]) | set(base.layers["feed-forward"])
    costs = {shape: count_layer(shape, fused, loras) for shape in shapes}
    headline = costs[SHOWN[HEADLINE]]
    with accelerator_branch_on_cpu():
        cpu_sequence = kernel_sequence(TINY, fused, "cpu", loras)
    tiny_on_meta = kernel_sequence(TINY, fused, "meta", loras)
    calls, repeats = (40, 3) if quick else (300, 7)
    figures = {
        "kernels_per_layer": len(headline.kernels),
        "bytes_per_element": round(headline.bytes_per_element, 2),
        "host_us_per_layer": round(host_us_per_layer(fused, loras, calls, repeats), 1),
        "extra_peak_bytes_per_element": round(headline.extra_peak_bytes / headline.shape.output_elements, 2),
        "projected_gate_over_base": {gpu: round(r, 3) for gpu, r in projection(base, costs, ("attention",)).items()},
        "projected_gate_over_base_722": {gpu: round(r, 3) for gpu, r in
                                         projection(base, costs, ("attention", "feed-forward")).items()},
        "host_syncs_per_layer": headline.syncs,
        "host_sequence_is_accelerator_sequence": cpu_sequence == tiny_on_meta,
        "shapes": {},
    }
    for label, shape in SHOWN.items():
        cost = costs[shape]
        figures["shapes"][label] = {
            "kernels": len(cost.kernels),
            "mb_moved": round(sum(k.moved for k in cost.kernels) / 1e6, 1),
            "bytes_per_element": round(cost.bytes_per_element, 2),
            "extra_peak_bytes_per_element": round(cost.extra_peak_bytes / shape.output_elements, 2),
            "linear_mb": round(sum(k.moved for k in cost.linear) / 1e6, 1),
            "linear_ran": cost.linear_ran,
            "phases": {phase: {"kernels": len(cost.phase(phase)),
                               "mb_moved": round(sum(k.moved for k in cost.phase(phase)) / 1e6, 1)}
                       for phase in PHASES},
        }
    return figures


# ---------------------------------------------------------------- output

def verdict(value: float, target: float) -> str:
    return "pass" if value <= target else "miss"


def report(results: dict, base: BaseModelCost, loras: int) -> None:
    paths = [name for name, figures in results.items() if figures is not None]
    flops = sum(k.flops for k in base.kernels)
    moved = sum(k.moved for k in base.kernels)
    logger.info("P-LoRA gate cost per gated-layer call: SDXL 1024x1024 (128x128 latent), fp16, batch 2 (CFG), "
                "%d rank-%d LoRAs; counted on the meta device (aten dispatch + fused_gate.launch)", loras, RANK)
    logger.info("base: ComfyUI's SDXL UNet, one batch-2 call: %d kernels, %.1f TFLOP, %.1f GB moved; roofline %s; "
                "gated layers: %d attention, %d with feed-forward and proj_in/out", len(base.kernels), flops / 1e12,
                moved / 1e9, ", ".join(f"{gpu} {base.seconds(gpu) * 1e3:.1f} ms" for gpu in GPUS),
                sum(base.layers["attention"].values()),
                sum(base.layers["attention"].values()) + sum(base.layers["feed-forward"].values()))
    for figures in results.values():
        if figures is None:
            logger.info("fused: not measured: plora_core/fused_gate.py does not exist in this checkout yet")
    header = f"{'at 640 ch x 4096 tokens (beyond the Linear)':<48}" + "".join(f"{p:>16}" for p in paths)
    logger.info("")
    logger.info("%s%10s", header, "target")
    rows = [("kernels per layer", "kernels_per_layer", "kernels_per_layer", "{:.0f}"),
            ("bytes per output element", "bytes_per_element", "bytes_per_element", "{:.1f}"),
            ("host us per layer (tiny CPU tensors)", "host_us_per_layer", "host_us_per_layer", "{:.1f}"),
            ("extra peak memory, bytes per element", "extra_peak_bytes_per_element", None, "{:.1f}"),
            ("gate/base per step, RTX 4090 (560 layers)", ("projected_gate_over_base", "rtx4090"), "rtx4090",
             "{:.3f}"),
            ("gate/base per step, H100 (560 layers)", ("projected_gate_over_base", "h100"), "h100", "{:.3f}"),
            ("gate/base per step, RTX 4090 (722 layers)", ("projected_gate_over_base_722", "rtx4090"), None,
             "{:.3f}"),
            ("gate/base per step, H100 (722 layers)", ("projected_gate_over_base_722", "h100"), None, "{:.3f}")]
    for label, key, target, number in rows:
        line = f"{label:<48}"
        for path in paths:
            value = results[path][key[0]][key[1]] if isinstance(key, tuple) else results[path][key]
            cell = number.format(value) + (f" {verdict(value, TARGETS[target])}" if target else "")
            line += f"{cell:>16}"
        logger.info("%s%10s", line, f"<= {TARGETS[target]}" if target else "")
    for path in paths:
        figures = results[path]
        if not figures["host_sequence_is_accelerator_sequence"]:
            logger.info("note (%s): the tiny CPU run's kernels differ from the meta run's; host us is approximate",
                        path)
        if figures["host_syncs_per_layer"]:
            logger.info("note (%s): %d host syncs per gated layer", path, figures["host_syncs_per_layer"])
    logger.info("")
    logger.info("%-42s%s", "per shape: kernels / MB moved",
                "".join(f"{p + ' ' + col:>16}" for p in paths for col in ("total", *PHASES)))
    for label in SHOWN:
        line = f"{label:<42}"
        for path in paths:
            shape = results[path]["shapes"][label]
            line += f"{shape['kernels']:>7} /{shape['mb_moved']:>7.0f}"
            for phase in PHASES:
                entry = shape["phases"][phase]
                line += f"{entry['kernels']:>7} /{entry['mb_moved']:>7.0f}"
        logger.info("%s   (Linear itself %s MB)", line, results[paths[0]]["shapes"][label]["linear_mb"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help='print one JSON object {"eager": {...}, "fused": {...}}')
    parser.add_argument("--quick", action="store_true", help="fewer host-timing calls (a rougher host us)")
    parser.add_argument("--loras", default="2", help="comma list of LoRA counts per layer, e.g. 2,3,4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("plora").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    try:
        counts = [int(n) for n in args.loras.split(",")]
    except ValueError:
        parser.error(f"--loras takes a comma list of integers, not {args.loras!r}")
    most = max_loras()
    if any(n < 2 or n > most for n in counts):
        parser.error(f"--loras {args.loras}: this LayerGate gates {'exactly 2' if most == 2 else f'2 to {most}'} "
                     "LoRAs per layer (subject and style); pass --loras 2")
    base = count_base_unet()
    by_count = {}
    for loras in counts:
        by_count[loras] = {"eager": path_figures(base, False, loras, args.quick),
                           "fused": path_figures(base, True, loras, args.quick) if fused_module() else None}
    if args.json:
        result = by_count[counts[0]] if len(counts) == 1 else {str(n): r for n, r in by_count.items()}
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    for loras, results in by_count.items():
        report(results, base, loras)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

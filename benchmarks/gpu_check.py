"""One prepared GPU check of the gate (issue 16), part one: per-layer timing and the fused kernel's accuracy.

At each SDXL 1024x1024 gated-layer shape of gate_cost.py (fp16, batch 2, two rank-64 LoRAs): the
Linear alone, the eager gate and the fused gate, in ms per call (CUDA events, the fastest of
several repeats), peak extra memory per call, and the fused kernel's divergences against the
eager float64 definition on the device. Refuses without CUDA (exit code 2) unless `--dry-run`
(= `--device cpu --tiny`), which runs the same code on tiny CPU shapes (the fused path with
TRITON_INTERPRET=1 where Triton is installed). Not yet here: the whole-UNet s/step for base,
direct, gate and guidance (benchmarks/gate_speed.py and guidance_speed.py measure those).

    python benchmarks/gpu_check.py              # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run    # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_cost import BATCH, SHOWN, TINY, LayerShape, fused_module, gate_path, make_gate  # noqa: E402

logger = logging.getLogger("plora.benchmark")


def kl_float64(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """KL(softmax(F + D) || softmax(F)) per sample by its definition, in float64 (the oracle)."""
    log_q = torch.log_softmax(base.double(), dim=-1)
    log_p = torch.log_softmax(base.double() + delta.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).reshape(base.shape[0], -1).mean(1)


def seconds(call, device: torch.device, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def check_shape(label: str, shape: LayerShape, device: torch.device, repeats: int) -> dict:
    linear = torch.nn.Linear(shape.in_features, shape.out_features, device=device, dtype=torch.float16)
    gate = make_gate(shape, 2)
    x = torch.randn(BATCH, shape.tokens, shape.in_features, device=device).to(torch.float16)
    row = {"shape": label}
    with torch.inference_mode():
        row["linear_ms"] = seconds(lambda: linear(x), device, repeats) * 1e3
        for path, fused in (("eager", False), ("fused", True)):
            if fused and fused_module() is None:
                continue
            with gate_path(fused):
                gate.forward(linear, x)
                row[f"{path}_ms"] = seconds(lambda: gate.forward(linear, x), device, repeats) * 1e3
        module = fused_module()
        if module is not None and (module.fused_available(x) or device.type == "cpu"):
            base = linear(x)
            deltas = gate.deltas(x, stacked=True)
            if module.fused_available(base):
                _, _, divergences = module.gate(base, deltas, "kl")
                reference = torch.stack([kl_float64(base, d) for d in deltas])
                row["fused_kl_max_rel_error"] = float(((divergences.double() - reference).abs()
                                                       / reference.abs().clamp_min(1e-30)).max())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU check of this script)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.dry_run:
        args.device, args.tiny, args.repeats = "cpu", True, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.error("gpu_check.py needs a CUDA GPU (none found); run `--dry-run` to check it on the CPU.")
        return 2
    device = torch.device(args.device)
    shapes = {"tiny": TINY} if args.tiny else SHOWN
    rows = [check_shape(label, shape, device, args.repeats) for label, shape in shapes.items()
            if not shape.context_fed]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    logger.info("P-LoRA gate per layer call, fp16, batch 2, two rank-%d LoRAs, %s", 4 if args.tiny else 64, where)
    logger.info("%-42s%10s%10s%10s%10s%14s", "shape", "Linear", "eager", "fused", "fused/eag", "fused KL err")
    for row in rows:
        fused = row.get("fused_ms", float("nan"))
        logger.info("%-42s%10.3f%10.3f%10.3f%10.2f%14.2e", row["shape"], row["linear_ms"], row["eager_ms"], fused,
                    fused / row["eager_ms"], row.get("fused_kl_max_rel_error", float("nan")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

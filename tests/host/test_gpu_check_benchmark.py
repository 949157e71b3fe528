"""benchmarks/gpu_check.py (issue 16): `--dry-run` runs every part of the GPU check on tiny CPU shapes and
prints its one table; without CUDA and without `--dry-run` it refuses with exit code 2."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TIMED_ROWS = ("base", "direct (2 LoRAs merged)", "gate eager", "gate fused", "fast + TAESD",
              "fast + VAE, decode size 32", "exact + TAESD")
NUMBER = r"-?\d+\.\d+"


def environment() -> dict:
    return dict(os.environ, COMFYUI_PATH=os.environ.get("COMFYUI_PATH", "/work/shared/comfyui"))


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def test_dry_run_prints_every_row_of_the_table():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env=environment(), timeout=300)
    output = done.stdout
    assert done.returncode == 0, (output + done.stderr)[-4000:]
    table = output[output.index("P-LoRA GPU check (issue 16)"):]
    lines = table.splitlines()
    assert "tiny shapes (dry run)" in lines[0]
    assert lines[1].split()[:4] == ["variant", "s/step", "x", "base"]
    assert any(line.startswith("SDXL UNet 64px, batch 1 + CFG, 2 rank-4 LoRAs on 32 attention projections")
               for line in lines)
    assert any(line.startswith("score guidance on the base UNet") for line in lines)
    for name in TIMED_ROWS:
        row = next((line for line in lines if line.startswith(f"  {name} ")), None)
        assert row is not None, (name, table)
        if name == "gate fused" and not triton_installed():
            assert "skipped: the fused gate cannot run here" in row
            continue
        seconds, versus_base = re.findall(NUMBER, row[len(name) + 2:])[:2]
        assert float(seconds) > 0 and float(versus_base) > 0, row
        assert "NOT FINITE" not in row
        if name.startswith("gate"):  # gate/direct: a third number
            assert len(re.findall(NUMBER, row[len(name) + 2:])) >= 3, row
    if triton_installed():
        fused = next(line for line in lines if line.startswith("  gate fused "))
        assert re.search(r"\d+ Triton launches/step", fused)
    layer = next(line for line in lines if line.startswith("  tiny "))
    assert len(re.findall(r"\d+\.\d+", layer)) >= (5 if triton_installed() else 2), layer
    accuracy = next(line for line in lines if line.startswith("fused KL vs float64"))
    if triton_installed():
        error = float(re.search(r"max relative error (\S+)", accuracy).group(1))
        assert error < 1e-4, accuracy
    assert re.search(r"^total: \d+ s \(budget 420 s, limit 480 s\)$", lines[-1]), lines[-1]
    assert "failed" not in table and "skipped: the time budget" not in table


def test_a_spent_budget_skips_variants_with_a_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--budget", "0", "--skip", "layers"],
                          capture_output=True, text=True, env=environment(), timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    table = done.stdout[done.stdout.index("P-LoRA GPU check (issue 16)"):]
    for name in ("base", "gate eager", "fast + TAESD", "exact + TAESD"):
        row = next(line for line in table.splitlines() if line.startswith(f"  {name} "))
        assert "skipped: the time budget (0 s) would run out" in row, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_without_cuda_it_refuses_with_exit_code_2():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=environment(),
                          timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stdout + done.stderr and "--dry-run" in done.stdout + done.stderr

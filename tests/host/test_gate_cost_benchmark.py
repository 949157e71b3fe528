"""benchmarks/gate_cost.py runs and counts correctly (issue 16): the counter against bytes written out by hand."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def cost_counter():
    spec = importlib.util.spec_from_file_location("cost_counter", ROOT / "benchmarks" / "cost_counter.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cost_counter", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_counter_counts_a_linear_and_an_in_place_add_by_their_bytes():
    log = cost_counter().CostLog()
    x = torch.empty(2, 10, 8, device="meta", dtype=torch.float16)
    w = torch.empty(6, 8, device="meta", dtype=torch.float16)
    with torch.inference_mode(), log:
        y = torch.nn.functional.linear(x, w)  # reads x, w; writes y
        y.view(-1).reshape(2, 10, 6)  # views: no kernel
        z = y.float()  # reads y (fp16), writes fp32
        z.add_(z)  # reads z once, writes z
    assert [k.name for k in log.kernels] == ["linear", "to", "add_"]
    assert [k.moved for k in log.kernels] == [2 * (160 + 48 + 120), 120 * 2 + 120 * 4, 2 * 120 * 4]
    assert log.kernels[0].flops == 2 * 20 * 6 * 8
    assert log.peak == 120 * 2 + 120 * 4  # y and z live together


def test_gate_cost_json_has_both_paths_and_their_keys():
    env = dict(os.environ, COMFYUI_PATH=os.environ.get("COMFYUI_PATH", "/work/shared/comfyui"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gate_cost.py"), "--json", "--quick"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"eager", "fused"}
    for path, figures in result.items():
        if figures is None:
            assert path == "fused"
            continue
        for key in ("kernels_per_layer", "bytes_per_element", "host_us_per_layer", "extra_peak_bytes_per_element"):
            assert figures[key] > 0, (path, key)
        assert set(figures["projected_gate_over_base"]) == {"rtx4090", "h100"}
        assert all(ratio > 1 for ratio in figures["projected_gate_over_base"].values())
    # the eager path's divergence reads F, D_c, D_s and float32 work buffers: far more than its output
    assert result["eager"]["bytes_per_element"] > 100

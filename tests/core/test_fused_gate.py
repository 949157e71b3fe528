"""The fused (Triton) gate against the eager reference and float64 definitions, run on the CPU by Triton's interpreter.

`plora_core.fused_gate` is what an accelerator runs; here `FORCE` sends CPU tensors through the
same kernels under TRITON_INTERPRET=1 (set before Triton is imported). Magnitudes as in
test_divergence_accuracy.py (320-10240 channels, logit std 1-100, deltas 1e-4..1e-1 of it), with
few tokens (the interpreter is slow) and token counts that are not multiples of the row block.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported; where something imported it before (a ComfyUI
# checkout does), the kernel tests run in a fresh pytest process with the variable set.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from plora_pack.plora_core import divergence, fused_gate  # noqa: E402
from plora_pack.plora_core import gate as gate_module  # noqa: E402
from plora_pack.plora_core.deltas import LayerDelta, LayerGeometry, LowRankPart  # noqa: E402
from plora_pack.plora_core.gate import DivergenceRule, LayerGate  # noqa: E402
from plora_pack.plora_core.recorder import GateState  # noqa: E402

_TRITON_ALREADY_COMPILING = not fused_gate.interpreting()

CRITERIA = ("kl", "js", "cosine", "dot")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# eager per-token parts and their float64 finish, as `divergence` computes them for one [rows, C] chunk
EAGER = {"kl": (divergence._kl_per_tokens, divergence._kl_from_parts),
         "js": (divergence._js_per_tokens, divergence._single_part),
         "cosine": (divergence._cosine_per_tokens, divergence._cosine_from_parts),
         "dot": (divergence._dot_per_tokens, divergence._negated)}


def rerun_with_the_interpreter(test_file: str, selection: str) -> None:
    """Run the tests of `test_file` matching `selection` (-k) in a new pytest process with TRITON_INTERPRET=1."""
    root = Path(test_file).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "pytest", test_file, "-k", selection, "-q", "-x"], cwd=root,
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(not _TRITON_ALREADY_COMPILING, reason="the kernel tests run in this process")
def test_kernel_tests_in_a_process_with_the_interpreter():
    rerun_with_the_interpreter(__file__, "not in_a_process")


@pytest.fixture
def forced(monkeypatch):
    """The fused path taken on the CPU (through the interpreter), every launch counted."""
    if _TRITON_ALREADY_COMPILING:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1: run by test_kernel_tests_in_a_process_...")
    monkeypatch.setattr(fused_gate, "FORCE", True)
    launches = []
    real = fused_gate.launch

    def counted(name, kernel, grid, reads, writes, *args, **meta):
        launches.append(name)
        return real(name, kernel, grid, reads, writes, *args, **meta)

    monkeypatch.setattr(fused_gate, "launch", counted)
    return launches


def per_token64(base: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every criterion by its definition in float64 per token (channels last): {name: [B, T]}."""
    f, tuned = base.double(), base.double() + delta.double()
    log_p, log_q = torch.log_softmax(tuned, -1), torch.log_softmax(f, -1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return {
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1),
        "js": 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1),
        "cosine": 1.0 - (tuned * f).sum(-1) / (tuned.norm(dim=-1) * f.norm(dim=-1)),
        "dot": (f * f).sum(-1) - (tuned * f).sum(-1),
    }


def make_layer(batch, tokens, channels, logit_std, delta_rel, dtype, unbalanced, count=2, seed=0):
    """(F [B, T, C], deltas [count, B, T, C]) in `dtype`; each delta's size differs by a few % per sample."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, tokens, channels, generator=generator) * logit_std
    if unbalanced:
        base[..., :4] *= 8.0
    deltas = torch.randn(count, batch, tokens, channels, generator=generator) * logit_std * delta_rel
    sizes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.05, 0.95, 1.02, 0.98], [0.9, 1.1, 1.0, 0.97]])
    deltas *= sizes[:count, :batch].reshape(count, batch, 1, 1)
    return base.to(DTYPES[dtype]), deltas.to(DTYPES[dtype])


# (batch, tokens, channels, logit std, delta / logit std, dtype, unbalanced channels)
CASES = [
    (2, 37, 320, 70.0, 1e-4, "fp32", False),   # 8-row blocks, 37 tokens: a ragged last block
    (3, 19, 640, 5.0, 1e-3, "fp16", False),
    (2, 24, 1280, 100.0, 1e-2, "fp16", True),
    (4, 5, 3072, 30.0, 1e-1, "bf16", False),   # Flux width, large deltas
    (2, 13, 2048, 4.0, 1e-1, "bf16", True),    # |v| ~ 2
    (2, 7, 5120, 10.0, 3e-2, "fp32", False),   # GEGLU 640: wider than one block, looped (5120 = 2.5 blocks)
    (2, 3, 10240, 1.0, 1e-4, "bf16", True),    # GEGLU 1280, tiny KL
]


def case_id(case):
    batch, tokens, channels, std, rel, dtype, unbalanced = case
    return f"B{batch}-T{tokens}-C{channels}-std{std:g}-d{rel:g}-{dtype}{'-unbal' if unbalanced else ''}"


def eager_per_token(criterion, base, deltas):
    """[N, B * T] float64 per-token values of the eager reference."""
    per_tokens, finish = EAGER[criterion]
    channels = base.shape[-1]
    parts = per_tokens(base.reshape(-1, channels), [d.reshape(-1, channels) for d in deltas], 1)
    return torch.stack([finish(p) for p in parts])


def fused_per_token(criterion, base, deltas):
    parts = fused_gate.shift_parts(base, deltas, criterion)
    finish = EAGER[criterion][1]
    return parts, torch.stack([finish(p) for p in parts])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_parts_and_divergences_equal_the_eager_reference_and_decide_as_float64(case, forced):
    batch, tokens, channels, std, rel, dtype, unbalanced = case
    base, deltas = make_layer(batch, tokens, channels, std, rel, dtype, unbalanced)
    for criterion in CRITERIA:
        parts, fused_tokens = fused_per_token(criterion, base, deltas)
        assert parts.dtype == torch.float32 and parts.shape == (2, fused_gate.CRITERIA[criterion][1], batch * tokens)
        eager_tokens = eager_per_token(criterion, base, deltas)
        exact = torch.stack([per_token64(base, d)[criterion].reshape(-1) for d in deltas])
        # per token: as close to float64 as the eager reference is, up to float32 rounding of the sums
        scale = exact.abs().mean(dim=1, keepdim=True)
        fused_error = ((fused_tokens - exact).abs() / scale).max()
        eager_error = ((eager_tokens - exact).abs() / scale).max()
        assert fused_error <= 2 * eager_error + 1e-4, (criterion, float(fused_error), float(eager_error))

        divergences, choice, subject = fused_gate.finish(parts, batch, criterion)
        reference = torch.stack(divergence.get_shift_divergence(criterion)(base, tuple(deltas), -1))
        assert divergences.shape == (2, batch) and divergences.dtype == torch.float32
        spread = reference.abs().max()
        assert ((divergences - reference).abs() <= 1e-4 * spread + 1e-12).all(), (criterion, divergences, reference)

        d64 = exact.view(2, batch, tokens).mean(dim=2)
        resolved = (d64[0] - d64[1]).abs() > 0.02 * d64.abs().max(dim=0).values
        assert resolved.any(), "the case separates the two LoRAs somewhere"
        assert torch.equal(subject[resolved], (d64[0] >= d64[1])[resolved]), criterion
        assert torch.equal(choice.long(), (~subject).long())
    assert forced.count("plora_parts") == len(CRITERIA) and forced.count("plora_finish") == len(CRITERIA)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_fused_gate_output_is_f_plus_the_chosen_delta_in_three_launches(criterion, forced):
    base, deltas = make_layer(3, 11, 640, 20.0, 1e-2, "fp16", True)
    out, subject, divergences = fused_gate.gate(base, deltas, criterion, style_bias=1.0)
    assert forced == ["plora_parts", "plora_finish", "plora_add"]
    expected = gate_module.add_selected(base, deltas[0], deltas[1], subject)
    assert out.dtype == torch.float16 and torch.equal(out, expected)
    # style_bias moves the choice as Eq. 13 with the bias does
    d_c, d_s = divergences
    for bias in (0.0, 1e9):
        _, biased, _ = fused_gate.gate(base, deltas, criterion, style_bias=bias)
        assert torch.equal(biased, d_c >= d_s * bias)


def test_more_than_two_deltas_each_match_the_eager_reference(forced):
    """Written for N deltas: each gets its own parts; the choice is the first maximising w_k d_k."""
    base, deltas = make_layer(4, 9, 1280, 30.0, 3e-2, "fp32", False, count=3)
    parts, fused_tokens = fused_per_token("kl", base, deltas)
    reference = torch.stack(divergence.kl_of_shifts(base, tuple(deltas), -1))
    divergences, choice, subject = fused_gate.finish(parts, 4, "kl", style_bias=1.0)
    assert torch.allclose(divergences, reference, rtol=1e-4)
    assert torch.equal(choice.long(), reference.argmax(dim=0)) and torch.equal(subject, choice == 0)


def test_strided_slices_of_a_fused_layer_read_in_place(forced):
    """Flux's qkv rows: F and the deltas narrowed to a slice of channels (row stride > C) need no copy."""
    base, deltas = make_layer(2, 10, 960, 10.0, 1e-2, "fp32", False)
    piece, piece_deltas = base.narrow(-1, 320, 320), deltas.narrow(-1, 320, 320)
    assert fused_gate.supports(piece, piece_deltas, -1, "kl")
    out, subject, divergences = fused_gate.gate(piece, piece_deltas, "kl")
    reference = torch.stack(divergence.kl_of_shifts(piece.contiguous(), tuple(piece_deltas.contiguous()), -1))
    assert torch.allclose(divergences, reference, rtol=1e-4)
    assert torch.equal(out, gate_module.add_selected(piece, piece_deltas[0], piece_deltas[1], subject))


def _linear_delta(out_features, in_features, rank, seed, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(out_features, rank, generator=generator) * 0.1
    down = torch.randn(rank, in_features, generator=generator) * 0.1
    return LayerDelta(LayerGeometry("linear", out_features, in_features), [LowRankPart(up, down, scale)])


def _gated_layer(criterion="kl", static_input=False, ranks=(8, 4)):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 320)
    state = GateState()
    gate = LayerGate("blk.attn2.to_k", _linear_delta(320, 96, ranks[0], 1), _linear_delta(320, 96, ranks[1], 2),
                     state, DivergenceRule(criterion), static_input=static_input)
    return layer, state, gate, gate.bind(layer.forward)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_layer_gate_takes_the_fused_path_and_gives_the_eager_result(criterion, forced, monkeypatch):
    layer, state, gate, gated = _gated_layer(criterion)
    x = torch.randn(2, 21, 96) * 3
    with torch.no_grad():
        fused_out = gated(x)
        fused_mask = state.recorder.decisions[(0, gate.layer)]
        assert forced == ["plora_parts", "plora_finish", "plora_add"]
        monkeypatch.setattr(fused_gate, "FORCE", False)
        eager_out = gated(x)
    assert len(forced) == 3, "the eager path launches nothing"
    assert torch.equal(state.recorder.decisions[(0, gate.layer)], fused_mask)
    assert torch.allclose(fused_out, eager_out, atol=1e-6)
    # the stacked deltas (one down GEMM, ranks 8 and 4 padded) are each LoRA's own up(down(x))
    deltas = gate.deltas(x)
    assert torch.allclose(deltas[0], gate.subject(x), atol=1e-6) and torch.allclose(deltas[1], gate.style(x), atol=1e-6)


def test_under_autograd_the_eager_path_runs(forced):
    layer, state, gate, gated = _gated_layer()
    x = torch.randn(2, 5, 96, requires_grad=True)
    gated(x).sum().backward()
    assert forced == [] and x.grad is not None


class CopyCounter(TorchDispatchMode):
    """Counts copies from the stand-in device (meta) to the CPU, answering them with zeros; notes float64 there."""

    def __init__(self):
        super().__init__()
        self.to_cpu: list[int] = []
        self.float64_on_device: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].is_meta \
                and torch.device(kwargs.get("device", "meta")).type == "cpu":
            self.to_cpu.append(args[0].numel())
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].is_meta:
            self.to_cpu.append(args[1].numel())
            return args[0].zero_()
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta and t.dtype == torch.float64:
                self.float64_on_device.append(str(func))
        return out


@pytest.mark.parametrize("criterion", CRITERIA)
def test_on_a_float64_less_device_only_per_token_parts_reach_the_cpu(criterion, monkeypatch):
    """A stand-in device without float64 (meta): no tensor of the layer output's size is copied to the CPU."""
    monkeypatch.setattr(gate_module, "FLOAT64_LESS_DEVICES", frozenset({"meta"}))
    layer = torch.nn.Linear(96, 320, device="meta")
    state = GateState()
    gate = LayerGate("blk.proj", _linear_delta(320, 96, 8, 1), _linear_delta(320, 96, 4, 2), state,
                     DivergenceRule(criterion))
    x = torch.empty(2, 64, 96, device="meta")
    counter = CopyCounter()
    with torch.no_grad(), counter:
        out = gate.bind(layer.forward)(x)
    assert out.shape == (2, 64, 320) and out.is_meta
    mask = state.recorder.decisions[(0, "blk.proj")]
    assert mask.shape == (2,) and mask.dtype == torch.bool
    tokens, layer_size = 2 * 64, 2 * 64 * 320
    assert counter.to_cpu, "the float64 finish ran on the CPU"
    assert max(counter.to_cpu) <= 3 * tokens < layer_size, counter.to_cpu
    assert counter.float64_on_device == []


def test_cached_context_layer_equals_recomputing_each_step(monkeypatch):
    """A context-fed layer reuses its output and decision while its input's value repeats, and recomputes
    when it changes; every step is still recorded. Inputs are new tensors each step, as ComfyUI's are."""
    _, state, cached, cached_fwd = _gated_layer(static_input=True)
    layer, reference_state, _, reference_fwd = _gated_layer(static_input=False)
    calls = []
    original = layer.forward

    def counting(x):
        calls.append(x.shape)
        return original(x)

    cached_fwd.original = counting
    contexts = [torch.randn(2, 7, 96) * 3, torch.randn(2, 7, 96) * 3]
    schedule = [0, 0, 1, 1, 0, 1]  # e.g. two conds with different timestep ranges, or a scheduled prompt
    for step, which in enumerate(schedule):
        sigma = 10.0 - step
        for s in (state, reference_state):
            s.begin_model_call(sigma, batch=2)
        with torch.inference_mode():
            got = cached_fwd(contexts[which].clone())
            want = reference_fwd(contexts[which].clone())
        assert torch.equal(got, want)
        assert torch.equal(state.recorder.decisions[(step, cached.layer)],
                           reference_state.recorder.decisions[(step, cached.layer)])
    assert len(calls) == 2, "computed once per distinct context"
    assert state.recorder.steps() == list(range(len(schedule)))
    state.begin_model_call(20.0, batch=2)  # a new run: nothing of the last one is reused
    with torch.inference_mode():
        cached_fwd(contexts[0].clone())
    assert len(calls) == 3

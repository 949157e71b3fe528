"""The fused (Triton) gate against the eager reference and float64 definitions, run on the CPU by Triton's interpreter.

`plora_core.fused_gate` is what an accelerator runs; here `FORCE` sends CPU tensors through the
same kernels under TRITON_INTERPRET=1 (set before Triton is imported). Every form of the deltas:
from the layer's input (`gate_from_input`: hidden = x @ down^T and D_k = hidden_k @ up_t[k] both
computed in the kernels), factored (`gate_factored`: the hidden given) and materialised (`gate`).
Magnitudes as in test_divergence_accuracy.py (320-5120 channels, logit std 1-100, deltas 1e-4..1e-1
of it), with few tokens (the interpreter is slow) and token counts that are not multiples of the
row block. The eager reference gets the deltas materialised in the model's dtype.
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
from plora_pack.plora_core.gate import DivergenceRule, LayerGate, RowSlice  # noqa: E402
from plora_pack.plora_core.recorder import GateState  # noqa: E402

_TRITON_ALREADY_COMPILING = not fused_gate.interpreting()

CRITERIA = ("kl", "js", "cosine", "dot")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


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

    def counted(name, kernel, grid, reads, writes, *args, flops=0.0, **meta):
        launches.append(name)
        return real(name, kernel, grid, reads, writes, *args, flops=flops, **meta)

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


SIZES = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.05, 0.95, 1.02, 0.98], [0.9, 1.1, 1.0, 0.97], [1.1, 0.9, 0.95, 1.04]])


def make_factored(batch, tokens, channels, logit_std, delta_rel, dtype, unbalanced, rank=16, count=2, seed=0):
    """(F [B, T, C], hidden [B, T, N * RP], up_t [N, RP, C]) in `dtype`; each LoRA's delta is about
    logit_std * delta_rel (within a factor sqrt 2), its size a few % different per sample (so that the
    LoRAs separate). The factors are small integers (hidden) and small integers times a power of two
    (up_t): every product and sum of D = hidden_k @ up_t[k] is exact in float32 whatever the order,
    so D rounded to the dtype is one tensor, the same from torch's matmul and from the kernels' tl.dot
    (otherwise a sum on the midpoint of two fp16 values may round either way: a 1-ulp D difference)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, tokens, channels, generator=generator) * logit_std
    if unbalanced:
        base[..., :4] *= 8.0
    hidden = torch.randn(batch, tokens, count, rank, generator=generator) * 4.0
    hidden = (hidden * SIZES[:count, :batch].T.reshape(batch, 1, count, 1)).round().clamp(-15, 15)
    up_t = (torch.randn(count, rank, channels, generator=generator) * 20.0).round().clamp(-64, 64)
    shift = round(math.log2(80.0 * math.sqrt(rank) / (logit_std * delta_rel)))
    up_t = up_t * 2.0 ** -shift
    return base.to(dtype), hidden.reshape(batch, tokens, count * rank).to(dtype), up_t.to(dtype)


def materialised(hidden, up_t):
    """[N, B, T, C]: hidden_k @ up_t[k] in the model's dtype (what a bmm gives)."""
    count, rank, _ = up_t.shape
    return torch.stack([hidden[..., k * rank:(k + 1) * rank] @ up_t[k] for k in range(count)])


def chosen_output(base, hidden, up_t, choice):
    """F + D_choice[b], D computed in float32 and rounded to the dtype, the sum in float32, rounded."""
    rank = up_t.shape[1]
    rows = []
    for b, k in enumerate(choice.tolist()):
        delta = (hidden[b, ..., k * rank:(k + 1) * rank].float() @ up_t[k].float()).to(base.dtype)
        rows.append((base[b].float() + delta.float()).to(base.dtype))
    return torch.stack(rows)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value of `x` (in its dtype), as float32."""
    bits = MANTISSA_BITS[x.dtype]
    tiny = torch.finfo(x.dtype).tiny
    magnitude = x.float().abs().clamp(min=tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - bits)


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """[B] index of the first maximum over dim 0 of [N, B] (ties -> the lowest index), written out."""
    best = values[0].clone()
    index = torch.zeros(values.shape[1], dtype=torch.long)
    for k in range(1, values.shape[0]):
        better = values[k] > best
        index[better] = k
        best = torch.where(better, values[k], best)
    return index


def check_against_references(criterion, base, deltas, divergences, choice, weights, tokens):
    """Divergences as the eager reference's within float32 rounding and as close to float64 as it;
    the choice the float64 one wherever the weighted divergences differ by more than 2 %."""
    count, batch = deltas.shape[:2]
    reference = torch.stack(divergence.get_shift_divergence(criterion)(base, tuple(deltas), -1))
    exact = torch.stack([per_token64(base, d)[criterion] for d in deltas]).mean(dim=2)  # [N, B] float64
    assert divergences.shape == (count, batch) and divergences.dtype == torch.float32
    assert choice.shape == (batch,) and choice.dtype == torch.int32
    scale = exact.abs().max(dim=0).values  # per sample
    fused_error = ((divergences.double() - exact).abs() / scale).max()
    eager_error = ((reference.double() - exact).abs() / scale).max()
    assert fused_error <= 2 * eager_error + 2e-6, (criterion, float(fused_error), float(eager_error))
    assert ((divergences - reference).abs() <= 2e-5 * reference.abs().max(dim=0).values).all(), \
        (criterion, divergences, reference)
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    weighted = w * exact
    top = weighted.sort(dim=0, descending=True).values
    resolved = (top[0] - top[1]) > 0.02 * weighted.abs().max(dim=0).values
    assert torch.equal(choice.long()[resolved], first_argmax(weighted)[resolved]), (criterion, choice, weighted)
    # and the choice is Eq. 13 on the divergences it returned (the first k maximising w_k d_k, float32)
    assert torch.equal(choice.long(), first_argmax(torch.tensor(weights, dtype=torch.float32)[:, None] * divergences))
    return resolved


# (batch, tokens, channels, logit std, delta / logit std, dtype, unbalanced channels, rank, LoRAs)
FACTORED_CASES = [
    (2, 37, 320, 70.0, 1e-4, "fp32", False, 16, 2),   # 37 tokens: 3 row blocks, a ragged last one
    (2, 19, 640, 5.0, 1e-3, "fp16", False, 32, 2),
    (2, 19, 1280, 100.0, 1e-2, "fp16", True, 16, 3),
    (2, 7, 3072, 30.0, 1e-1, "bf16", False, 16, 2),   # Flux width, large deltas
    (2, 13, 2048, 4.0, 1e-1, "bf16", True, 32, 4),    # |v| ~ 2
    (2, 5, 5120, 10.0, 3e-2, "fp32", False, 16, 2),   # GEGLU 640: 20 channel blocks
]


def case_id(case):
    batch, tokens, channels, std, rel, dtype, unbalanced, rank, count = case
    return (f"B{batch}-T{tokens}-C{channels}-std{std:g}-d{rel:g}-{dtype}{'-unbal' if unbalanced else ''}"
            f"-r{rank}-N{count}")


@pytest.mark.parametrize("case", FACTORED_CASES, ids=case_id)
def test_factored_gate_equals_the_eager_reference_and_decides_as_float64(case, forced):
    batch, tokens, channels, std, rel, dtype, unbalanced, rank, count = case
    base, hidden, up_t = make_factored(batch, tokens, channels, std, rel, DTYPES[dtype], unbalanced, rank, count)
    deltas = materialised(hidden, up_t)
    weights = (1.0,) * count
    separated = torch.zeros(batch, dtype=torch.bool)
    for criterion in CRITERIA:
        assert fused_gate.supports_factored(base, hidden, up_t, criterion)
        forced.clear()
        out, choice, divergences = fused_gate.gate_factored(base, hidden, up_t, criterion, weights)
        assert forced == ["plora_parts", "plora_add"]
        separated |= check_against_references(criterion, base, deltas, divergences, choice, weights, tokens)
        expected = chosen_output(base, hidden, up_t, choice)
        assert out.dtype == base.dtype and out.shape == base.shape and out.is_contiguous()
        # within one ulp (D's float32 sum is exact here, so the output is in fact bit-exact)
        assert ((out.float() - expected.float()).abs() <= ulp(expected)).all(), criterion
        assert torch.equal(out, expected), criterion
        other = chosen_output(base, hidden, up_t, (choice + 1) % count)
        assert not torch.equal(out, other), "the LoRAs' outputs differ: the test sees which was added"
    assert separated.all(), "every sample's LoRAs are told apart by some criterion"


@pytest.mark.parametrize("criterion", CRITERIA)
def test_weights_choose_as_eq13_with_weights_ties_to_the_lowest_index(criterion, forced):
    base, hidden, up_t = make_factored(2, 9, 320, 10.0, 1e-2, torch.float32, False, rank=16, count=3)
    _, _, divergences = fused_gate.gate_factored(base, hidden, up_t, criterion, (1.0, 1.0, 1.0))
    for weights in ((1e9, 1.0, 1.0), (1.0, 1e9, 1.0), (1.0, 1.0, 1e9), (0.5, 2.0, 1.0), (0.0, 0.0, 0.0)):
        _, choice, again = fused_gate.gate_factored(base, hidden, up_t, criterion, weights)
        assert torch.equal(again, divergences), "weights change the choice only"
        expected = first_argmax(torch.tensor(weights)[:, None] * divergences)
        assert torch.equal(choice.long(), expected), (weights, choice, divergences)
        if max(weights) == 1e9 and criterion != "dot":  # dot's d may be negative: a huge weight then loses
            assert (choice == weights.index(1e9)).all()
    # LoRAs 1 and 2 identical (ties): the lower index wins
    twin_up, twin_hidden = up_t.clone(), hidden.clone()
    twin_up[2] = twin_up[1]
    twin_hidden[..., 32:48] = twin_hidden[..., 16:32]
    _, choice, tied = fused_gate.gate_factored(base, twin_hidden, twin_up, criterion, (0.0, 1.0, 1.0))
    assert torch.equal(tied[1], tied[2]) and (choice != 2).all()
    assert torch.equal(choice.long(), first_argmax(torch.tensor([0.0, 1.0, 1.0])[:, None] * tied))
    if criterion != "dot":  # divergences > 0: LoRA 0 (weight 0) loses, 1 wins the tie with 2
        assert (choice == 1).all()


def test_rows_wider_than_one_block_and_one_block_rows_agree(forced, monkeypatch):
    """The channel loop (a small CHANNEL_BLOCK: 5120 channels in 20 blocks), the rows (a larger ROW_BLOCK)."""
    base, hidden, up_t = make_factored(2, 19, 5120, 10.0, 3e-2, torch.float16, False, rank=16)
    results = {}
    for channel_block, row_block in ((256, 16), (4096, 16), (1024, 32)):
        monkeypatch.setattr(fused_gate, "CHANNEL_BLOCK", channel_block)
        monkeypatch.setattr(fused_gate, "ROW_BLOCK", row_block)
        results[channel_block, row_block] = fused_gate.gate_factored(base, hidden, up_t, "kl")
    first = results[256, 16]
    for out, choice, divergences in results.values():
        assert torch.equal(choice, first[1])
        assert torch.allclose(divergences, first[2], rtol=1e-5, atol=0)
        assert torch.equal(out, first[0])  # every block adds the same rounded D: the same output
    check_against_references("kl", base, materialised(hidden, up_t), first[2], first[1], (1.0, 1.0), 19)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_materialised_gate_equals_the_eager_reference_and_adds_the_chosen_delta(dtype, forced):
    base, hidden, up_t = make_factored(2, 19, 640, 30.0, 3e-2, DTYPES[dtype], True, rank=16, count=3)
    deltas = materialised(hidden, up_t)
    for criterion in CRITERIA:
        assert fused_gate.supports(base, deltas, -1, criterion)
        forced.clear()
        weights = (1.0, 0.9, 1.1)
        out, choice, divergences = fused_gate.gate(base, deltas, criterion, weights)
        assert forced == ["plora_parts", "plora_add"]
        check_against_references(criterion, base, deltas, divergences, choice, weights, 19)
        chosen = deltas[choice.long(), torch.arange(2)]
        assert torch.equal(out, (base.float() + chosen.float()).to(base.dtype)), criterion


def test_strided_slices_of_a_fused_layer_read_in_place(forced):
    """Flux's qkv rows: F and the deltas narrowed to a slice of channels (row stride > C) need no copy."""
    base, hidden, up_t = make_factored(2, 10, 960, 10.0, 1e-2, torch.float32, False, rank=16)
    deltas = materialised(hidden, up_t)
    piece, piece_deltas = base.narrow(-1, 320, 320), deltas.narrow(-1, 320, 320)
    assert fused_gate.supports(piece, piece_deltas, -1, "kl")
    out, choice, divergences = fused_gate.gate(piece, piece_deltas, "kl")
    reference = torch.stack(divergence.kl_of_shifts(piece.contiguous(), tuple(piece_deltas.contiguous()), -1))
    assert torch.allclose(divergences, reference, rtol=1e-5)
    assert torch.equal(out, (piece.float() + piece_deltas[choice.long(), torch.arange(2)].float()))
    # the factored form on a slice of F: its up_t slice made contiguous (a tiny tensor), F read in place
    up_piece = up_t.narrow(-1, 320, 320).contiguous()
    assert fused_gate.supports_factored(piece, hidden, up_piece, "kl")
    out_f, choice_f, divergences_f = fused_gate.gate_factored(piece, hidden, up_piece, "kl")
    assert torch.equal(choice_f, choice) and torch.allclose(divergences_f, divergences, rtol=1e-5)


def make_from_input(batch, tokens, channels, in_features, dtype, ranks, logit_std=10.0, delta_rel=3e-2, seed=0):
    """(F [B, T, C], x [B, T, IN], down [N RP, IN], up_t [N, RP, C]) in `dtype`, RP the largest rank padded
    to a power of two >= 16, LoRA k of rank ranks[k] (zero rows of down and up_t past it, as
    DeltaStack pads). x is small integers and down sparse +-1, so hidden = x @ down^T is integers of at
    most a few tens: exact in every dtype whatever the order of the sums (torch's F.linear and the
    kernels' tl.dot give one tensor); up_t small integers times a power of two, sized so that each
    LoRA's delta is about logit_std * delta_rel, a little larger for the later LoRAs."""
    generator = torch.Generator().manual_seed(seed)
    count, rank = len(ranks), max(16, 1 << (max(ranks) - 1).bit_length())
    base = torch.randn(batch, tokens, channels, generator=generator) * logit_std
    x = (torch.randn(batch, tokens, in_features, generator=generator) * 1.5).round().clamp(-3, 3)
    sign = torch.randint(0, 2, (count * rank, in_features), generator=generator) * 2.0 - 1.0
    down = sign * (torch.rand(count * rank, in_features, generator=generator) < 0.15)
    up_t = (torch.randn(count, rank, channels, generator=generator) * 20.0).round().clamp(-64, 64)
    for k, r in enumerate(ranks):
        down[k * rank + r:(k + 1) * rank] = 0.0
        up_t[k, r:] = 0.0
        up_t[k] *= 1.0 + 0.25 * k
    spread = float((x.reshape(-1, in_features) @ down.T).std()) * 20.0 * math.sqrt(max(ranks))
    up_t = up_t * 2.0 ** -round(math.log2(spread / (logit_std * delta_rel)))
    return base.to(dtype), x.to(dtype), down.to(dtype), up_t.to(dtype)


# (batch, tokens, channels, input features, dtype, ranks): IN > C and IN < C, IN not a multiple of the
# K block (INPUT_BLOCK 64) and below one, ragged token counts, N = 2 and 3 in every dtype
FROM_INPUT_CASES = [
    (2, 37, 64, 200, "fp32", (16, 9)),        # 37 tokens: 3 row blocks; IN = 3 K blocks + 8
    (2, 9, 48, 72, "fp32", (8, 8, 16)),
    (2, 17, 80, 300, "fp16", (16, 16)),
    (2, 19, 320, 96, "fp16", (32, 20, 8)),   # RP 32
    (2, 21, 160, 40, "bf16", (16, 16)),      # IN under one K block
    (3, 13, 96, 130, "bf16", (16, 4, 12)),
]


def from_input_id(case):
    batch, tokens, channels, inner, dtype, ranks = case
    return f"B{batch}-T{tokens}-C{channels}-IN{inner}-{dtype}-N{len(ranks)}"


@pytest.mark.parametrize("case", FROM_INPUT_CASES, ids=from_input_id)
def test_gate_from_input_equals_the_factored_gate_on_torchs_down_projection(case, forced):
    """The down projection in the parts kernel gives F.linear's hidden in the model's dtype (checked where the
    kernel writes it), and the whole result is gate_factored's on that hidden, bit for bit."""
    batch, tokens, channels, inner, dtype, ranks = case
    base, x, down, up_t = make_from_input(batch, tokens, channels, inner, DTYPES[dtype], ranks)
    count = len(ranks)
    hidden = torch.nn.functional.linear(x, down)
    exact = x.double() @ down.double().T
    assert torch.equal(hidden.double(), exact), "the premise: the hidden is exact in the dtype"
    assert (hidden != 0).any(dim=-1).all() and hidden.abs().max() <= 256
    first = (3.0,) + (0.5,) * (count - 1)  # the later LoRAs' deltas are larger: unweighted, they tend to win
    chosen = set()
    for criterion in CRITERIA:
        assert fused_gate.supports_from_input(base, x, down, up_t, criterion)
        for weights in ((1.0,) * count, first):
            forced.clear()
            out, choice, divergences, written = fused_gate.gate_from_input_and_hidden(base, x, down, up_t,
                                                                                      criterion, weights)
            assert forced == ["plora_parts", "plora_add"]
            assert written.shape == hidden.shape and written.is_contiguous() and torch.equal(written, hidden)
            want = fused_gate.gate_factored(base, hidden, up_t, criterion, weights)
            assert torch.equal(choice, want[1]) and torch.equal(divergences, want[2]), (criterion, weights)
            assert out.shape == base.shape and out.dtype == base.dtype and torch.equal(out, want[0]), criterion
            assert torch.equal(out, chosen_output(base, hidden, up_t, choice))
            assert not torch.equal(out, chosen_output(base, hidden, up_t, (choice + 1) % count))
            again = fused_gate.gate_from_input(base, x, down, up_t, criterion, weights)
            assert all(torch.equal(a, b) for a, b in zip(again, (out, choice, divergences)))
            chosen.update(choice.tolist())
    assert len(chosen) > 1, "more than one LoRA chosen: the add kernel reads the hidden at k = 0 and k > 0"


def test_gate_from_input_block_sizes_agree(forced, monkeypatch):
    """The K loop in blocks of 16 (IN 100: 7 blocks, the last ragged) and in one block of 128; rows in 32."""
    base, x, down, up_t = make_from_input(2, 19, 96, 100, torch.float16, (16, 12))
    results = []
    for input_block, row_block in ((16, 16), (128, 16), (64, 32)):
        monkeypatch.setattr(fused_gate, "INPUT_BLOCK", input_block)
        monkeypatch.setattr(fused_gate, "ROW_BLOCK", row_block)
        results.append(fused_gate.gate_from_input_and_hidden(base, x, down, up_t, "js"))
    for out, choice, divergences, hidden in results:
        assert torch.equal(hidden, torch.nn.functional.linear(x, down))
        assert torch.equal(out, results[0][0]) and torch.equal(choice, results[0][1])
        assert torch.allclose(divergences, results[0][2], rtol=1e-5, atol=0)


def test_gate_from_input_on_a_slice_of_the_output(forced):
    """F a slice of a fused layer's output (row stride > C) with its up_t columns; x the whole input."""
    base, x, down, up_t = make_from_input(2, 10, 192, 80, torch.float32, (16, 16))
    piece, up_piece = base.narrow(-1, 64, 96), up_t.narrow(-1, 64, 96).contiguous()
    assert fused_gate.supports_from_input(piece, x, down, up_piece, "kl")
    out, choice, divergences = fused_gate.gate_from_input(piece, x, down, up_piece, "kl")
    want = fused_gate.gate_factored(piece.contiguous(), torch.nn.functional.linear(x, down), up_piece, "kl")
    assert torch.equal(out, want[0]) and torch.equal(choice, want[1]) and torch.equal(divergences, want[2])


def test_what_the_from_input_path_refuses():
    half = dict(dtype=torch.float16)
    base, x = torch.empty(2, 8, 320, **half), torch.empty(2, 8, 96, **half)
    down, up_t = torch.empty(64, 96, **half), torch.empty(2, 32, 320, **half)
    assert fused_gate.supports_from_input(base, x, down, up_t, "kl")
    assert not fused_gate.supports_from_input(base, x, down, up_t, "l2")
    assert not fused_gate.supports_from_input(base, x.float(), down, up_t, "kl")
    assert not fused_gate.supports_from_input(base, x, down.float(), up_t, "kl")
    assert not fused_gate.supports_from_input(base, x[:, :4], down, up_t, "kl")  # other token dims
    assert not fused_gate.supports_from_input(base, x.reshape(16, 96), down, up_t, "kl")
    assert not fused_gate.supports_from_input(base, x.transpose(0, 1).contiguous().transpose(0, 1), down, up_t,
                                              "kl")  # rows not flattenable
    assert not fused_gate.supports_from_input(base, x, torch.empty(64, 80, **half), up_t, "kl")  # IN
    assert not fused_gate.supports_from_input(base, x, torch.empty(96, 64, **half).t(), up_t, "kl")  # strided
    assert not fused_gate.supports_from_input(base, x, torch.empty(48, 96, **half), up_t, "kl")  # N RP
    assert not fused_gate.supports_from_input(base, x, torch.empty(48, 96, **half),
                                              torch.empty(2, 24, 320, **half), "kl")  # rank 24
    assert fused_gate.supports_from_input(base, x.transpose(0, 1).contiguous().transpose(0, 1)[:1], down, up_t,
                                          "kl") is False  # token dims differ
    assert fused_gate.supports_from_input(base[:1], x.transpose(0, 1).contiguous().transpose(0, 1)[:1], down,
                                          up_t, "kl")  # one sample: its rows flatten


def test_launches_declare_their_bytes_and_flops(monkeypatch):
    """On meta (nothing runs): two launches, the parts kernel 2 RP per element, delta and pass over D."""
    calls = []
    monkeypatch.setattr(fused_gate, "launch", lambda name, kernel, grid, reads, writes, *args, flops=0.0, **meta:
                        calls.append((name, grid, reads, writes, flops)))
    meta = dict(device="meta", dtype=torch.float16)
    base, hidden = torch.empty(2, 100, 640, **meta), torch.empty(2, 100, 128, **meta)
    up_t = torch.empty(2, 64, 640, **meta)
    for criterion, passes in (("kl", 2), ("js", 3), ("cosine", 1), ("dot", 1)):
        calls.clear()
        out, choice, divergences = fused_gate.gate_factored(base, hidden, up_t, criterion)
        assert [c[0] for c in calls] == ["plora_parts", "plora_add"]
        assert calls[0][1] == calls[1][1] == (2, math.ceil(100 / fused_gate.ROW_BLOCK))
        assert calls[0][4] == 2 * 64 * base.numel() * 2 * passes and calls[1][4] == 2 * 64 * base.numel()
        assert calls[1][3] == (out, choice, divergences) and calls[0][3][0].shape == (2, 2, calls[0][1][1])
        assert out.shape == base.shape and choice.shape == (2,) and divergences.shape == (2, 2)
    x, down = torch.empty(2, 100, 320, **meta), torch.empty(128, 320, **meta)
    for criterion, passes in (("kl", 2), ("js", 3), ("cosine", 1), ("dot", 1)):
        calls.clear()
        out, choice, divergences, written = fused_gate.gate_from_input_and_hidden(base, x, down, up_t, criterion)
        assert [c[0] for c in calls] == ["plora_parts", "plora_add"]
        assert calls[0][1] == calls[1][1] == (2, math.ceil(100 / fused_gate.ROW_BLOCK))
        assert calls[0][2] == (base, x, down, up_t) and calls[0][3][0] is written
        assert written.shape == (2, 100, 128) and written.is_contiguous()
        assert calls[0][4] == 2 * 64 * base.numel() * 2 * passes + 2 * 320 * 128 * 200
        assert calls[1][4] == 2 * 64 * base.numel() and calls[1][2][-1] is calls[0][3][1]
        assert calls[1][2][1].shape == (2, 100, 64) and calls[1][2][1].data_ptr() == written.data_ptr()
        assert calls[1][3] == (out, choice, divergences)
    calls.clear()
    fused_gate.gate(base, torch.empty(2, 2, 100, 640, **meta), "kl")
    assert [c[4] for c in calls] == [0.0, 0.0]


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_no_torch_op_but_allocations_and_views(monkeypatch):
    monkeypatch.setattr(fused_gate, "launch", lambda *args, **kwargs: None)
    meta = dict(device="meta", dtype=torch.bfloat16)
    base, hidden = torch.empty(2, 33, 320, **meta), torch.empty(2, 33, 96, **meta)
    up_t = torch.empty(3, 32, 320, **meta)
    recorder = OpRecorder()
    with recorder:
        fused_gate.gate_factored(base, hidden, up_t, "js", (1.0, 2.0, 0.5))
        fused_gate.gate(base, torch.empty(3, 2, 33, 320, **meta), "kl", (1.0, 2.0, 0.5))
        fused_gate.gate_from_input(base, torch.empty(2, 33, 200, **meta), torch.empty(96, 200, **meta), up_t,
                                   "cosine", (1.0, 2.0, 0.5))
    assert "empty" in recorder.ops[-4:]  # the last call was recorded (its hidden, partials, outputs)
    assert recorder.ops and set(recorder.ops) <= {"empty", "slice", "select"}, recorder.ops


def test_what_the_factored_path_refuses():
    base = torch.empty(2, 8, 320, dtype=torch.float16)
    up_t = torch.empty(2, 32, 320, dtype=torch.float16)
    hidden = torch.empty(2, 8, 64, dtype=torch.float16)
    assert fused_gate.supports_factored(base, hidden, up_t, "kl")
    assert not fused_gate.supports_factored(base, hidden, up_t, "l2")
    assert not fused_gate.supports_factored(base, torch.empty(2, 8, 48, dtype=torch.float16),
                                            torch.empty(2, 24, 320, dtype=torch.float16), "kl")  # rank 24
    assert not fused_gate.supports_factored(base, torch.empty(2, 8, 16, dtype=torch.float16),
                                            torch.empty(2, 8, 320, dtype=torch.float16), "kl")  # rank 8 < 16
    assert not fused_gate.supports_factored(base, hidden.float(), up_t, "kl")
    assert not fused_gate.supports_factored(base, hidden, up_t.transpose(1, 2).contiguous().transpose(1, 2), "kl")
    assert not fused_gate.supports_factored(base, hidden[:, :4], up_t, "kl")
    assert not fused_gate.supports_factored(base.transpose(1, 2).contiguous().transpose(1, 2), hidden, up_t, "kl")
    assert not fused_gate.supports_factored(base, torch.empty(2, 8, 9 * 16, dtype=torch.float16),
                                            torch.empty(9, 16, 320, dtype=torch.float16), "kl")  # N > 8
    with pytest.raises(ValueError, match="3 weights for 2 deltas"):
        fused_gate.gate_factored(base.to("meta"), hidden.to("meta"), up_t.to("meta"), "kl", (1.0, 1.0, 1.0))


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
        assert forced == ["plora_parts", "plora_add"], "plain LoRAs: the deltas formed in the kernels"
        monkeypatch.setattr(fused_gate, "FORCE", False)
        eager_out = gated(x)
    assert len(forced) == 2, "the eager path launches nothing"
    assert torch.equal(state.recorder.decisions[(0, gate.layer)], fused_mask)
    assert torch.allclose(fused_out, eager_out, atol=1e-6)
    # the stacked deltas (one down GEMM, ranks 8 and 4 padded) are each LoRA's own up(down(x))
    deltas = gate.deltas(x)
    assert torch.allclose(deltas[0], gate.subject(x), atol=1e-6) and torch.allclose(deltas[1], gate.style(x), atol=1e-6)


def test_layer_gate_over_three_loras_and_a_non_plain_delta_take_the_fused_paths(forced, monkeypatch):
    """N = 3 with weights through LayerGate: the fused choice and output are the eager ones, for plain deltas
    (factored kernels) and for a delta with a bias diff (the stacked deltas read by the kernels)."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(96, 320)
    x = torch.randn(3, 17, 96) * 3
    with_bias = _linear_delta(320, 96, 4, 5)
    with_bias.bias = torch.randn(320) * 0.05
    for deltas, launches in (([_linear_delta(320, 96, r, 3 + r) for r in (8, 4, 16)], ["plora_parts", "plora_add"]),
                             ([_linear_delta(320, 96, 8, 1), with_bias, _linear_delta(320, 96, 2, 7)],
                              ["plora_parts", "plora_add"])):
        forced.clear()
        monkeypatch.setattr(fused_gate, "FORCE", True)
        rule = DivergenceRule("kl", weights=(1.0, 1.3, 0.8))
        fused_state, eager_state = GateState(), GateState()
        fused_gate_layer = LayerGate("blk.proj", state=fused_state, rule=rule, deltas=deltas)
        eager_gate_layer = LayerGate("blk.proj", state=eager_state, rule=rule, deltas=deltas)
        with torch.no_grad():
            fused_out = fused_gate_layer.forward(layer.forward, x)
            assert forced == launches
            monkeypatch.setattr(fused_gate, "FORCE", False)
            eager_out = eager_gate_layer.forward(layer.forward, x)
        assert torch.equal(fused_state.recorder.choices[(0, "blk.proj")], eager_state.recorder.choices[(0, "blk.proj")])
        assert torch.allclose(fused_out, eager_out, atol=1e-5)


MATMULS = {"mm", "addmm", "bmm", "matmul", "linear"}


def test_layer_gate_runs_no_down_projection_of_its_own(forced, monkeypatch):
    """Plain LoRAs: the two launches are the whole gate (no torch GEMM: the down projection is in the parts
    kernel). Where x's rows do not flatten, torch's F.linear and the factored kernels: the same decision."""
    layer, state, gate, _ = _gated_layer("kl")
    x = torch.randn(2, 21, 96) * 3
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, rows not flattenable
    with torch.no_grad():
        base = layer(x)
        outputs, choices = [], []
        for inputs, torch_gemm in ((x, False), (strided, True)):
            forced.clear()
            recorder = OpRecorder()
            with recorder:
                outputs.append(gate.forward(lambda _: base, inputs))
            choices.append(state.recorder.choices[(0, gate.layer)])
            assert forced == ["plora_parts", "plora_add"]
            assert bool(MATMULS & set(recorder.ops)) == torch_gemm, recorder.ops
        monkeypatch.setattr(fused_gate, "FORCE", False)
        eager = gate.forward(lambda _: base, x)
    assert torch.equal(choices[0], choices[1]) and torch.equal(state.recorder.choices[(0, gate.layer)], choices[0])
    assert torch.allclose(outputs[0], eager, atol=1e-6) and torch.allclose(outputs[1], eager, atol=1e-6)


def test_layer_gate_row_slices_project_once_and_reuse_the_hidden(forced, monkeypatch):
    """Flux's fused qkv: each slice decides on its own; the first computes x @ down^T in its parts kernel,
    the others read it (gate_factored on their up^T columns); the result is the eager one."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(96, 320)
    slices = (RowSlice("q", 0, 96), RowSlice("k", 96, 96), RowSlice("v", 192, 128))
    deltas = [_linear_delta(320, 96, 8, 11, scale=2.0), _linear_delta(320, 96, 4, 12, scale=2.0)]
    fused_state, eager_state = GateState(), GateState()
    fused_layer = LayerGate("blk.qkv", state=fused_state, deltas=deltas, row_slices=slices)
    eager_layer = LayerGate("blk.qkv", state=eager_state, deltas=deltas, row_slices=slices)
    projected = []
    counted = fused_gate.launch

    def spy(name, kernel, grid, reads, writes, *args, flops=0.0, **meta):
        if name == "plora_parts":
            projected.append(meta["PROJECT"])
        return counted(name, kernel, grid, reads, writes, *args, flops=flops, **meta)

    monkeypatch.setattr(fused_gate, "launch", spy)
    x = torch.randn(2, 19, 96) * 3
    with torch.no_grad():
        recorder = OpRecorder()
        with recorder:
            fused_out = fused_layer.forward(layer.forward, x)
        assert forced == ["plora_parts", "plora_add"] * 3 and projected == [True, False, False]
        assert MATMULS & set(recorder.ops) == {"addmm"}, "the layer's own Linear only"
        monkeypatch.setattr(fused_gate, "FORCE", False)
        eager_out = eager_layer.forward(layer.forward, x)
    for piece in slices:
        name = (0, f"blk.qkv[{piece.name}]")
        assert torch.equal(fused_state.recorder.choices[name], eager_state.recorder.choices[name]), name
    assert torch.allclose(fused_out, eager_out, atol=1e-5)


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

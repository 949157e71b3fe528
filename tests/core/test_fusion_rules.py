"""K-LoRA's Top-K choice and B-LoRA's block routing against their definitions written out.

Oracles: dense dW = scale * up @ down in float64 and torch.topk on it; K-LoRA's rule and gamma
as its code states them (HVision-NKU/K-LoRA klora.py L43-73, utils.py L157-209), including its
global layer-call counter; B-LoRA's blocks as SDXL module paths listed by hand.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from plora_pack.plora_core import fusion_rules
from plora_pack.plora_core.deltas import DensePart, LayerDelta, LayerGeometry, LowRankPart
from plora_pack.plora_core.fusion_rules import (
    KLoraRule,
    b_lora_routing,
    klora_gamma,
    klora_layer_scores,
    klora_time,
    klora_time_scale,
    layer_abs_stats,
    low_rank_abs_stats,
    schedule_position,
    topk_abs_sum,
)
from plora_pack.plora_core.recorder import STYLE, SUBJECT

# --- the definitions written out --------------------------------------------------------------------


def dense_dw(up, down, scale, mid=None):
    """dW in float64; a LoCon mid as the sum over both inner ranks, written as per-tap matrix products."""
    u, d = up.double().reshape(up.shape[0], -1), down.double().reshape(down.shape[0], -1)
    if mid is None:
        return scale * (u @ d).reshape(up.shape[0], *down.shape[1:])  # conv: [out, in, kh, kw]
    kh, kw = mid.shape[2:]
    taps = [[u @ mid[:, :, h, w].double() @ d for w in range(kw)] for h in range(kh)]  # each [out, in]
    return scale * torch.stack([torch.stack(row, -1) for row in taps], -2)  # [out, in, kh, kw]


def topk_sum(dw, k):
    flat = dw.abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def reference_gamma(pairs):
    """utils.py get_ratio_between_content_and_style on dense (dW_c, dW_s) pairs."""
    ratios = [float(c.abs().sum()) / float(s.abs().sum()) for c, s in pairs]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else float("inf")


def reference_choice(top1, top2, gamma, time_ratio, sum_timesteps, pattern):
    """klora.py get_klora_weight, given the two Top-K sums: True when matrix1 (the content LoRA) is returned."""
    alpha, beta = (1.5, 1.5 * 0.85) if pattern == "s*" else (1.5, 0.5)  # inference_sd.py L51-56
    scale = alpha * time_ratio / sum_timesteps + beta
    if pattern == "s*":
        scale = scale % alpha
    top1 = top1 / gamma
    top2 = top2 * scale
    return top1 / top2 > 1 if top2 != 0 else top1 > 0


# --- sigma schedules of different shapes (each ends at 0; the run has len - 1 steps) ------------------

def karras(n, sigma_min=0.0292, sigma_max=14.6146, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def normal(n):
    """SD's scaled-linear discrete sigmas sampled at timesteps evenly spaced 999 -> 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    cumprod = torch.cumprod(1 - betas, 0)
    table = ((1 - cumprod) / cumprod).sqrt()
    t = torch.linspace(999, 0, n, dtype=torch.float64)
    low = t.floor().long()
    high = (low + 1).clamp(max=999)
    w = t - low
    sig = (1 - w) * table[low].log() + w * table[high].log()
    return torch.cat([sig.exp(), torch.zeros(1, dtype=torch.float64)])


def flow_shift(n, shift=3.0):
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift * t / (1 + (shift - 1) * t), torch.zeros(1, dtype=torch.float64)])


def diffusers_flux(n=28, mu=1.15):
    """FluxPipeline's FlowMatchEulerDiscrete schedule (dynamic shift mu for 1024x1024)."""
    s = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


SCHEDULES = {"karras": karras, "normal": normal, "flow_shift_3": flow_shift}


# --- LoRA pairs on real SDXL layer shapes, ranks 16/32/64, magnitudes far apart -----------------------

# (out, in, subject rank, style rank, subject magnitude, style magnitude)
SDXL_LAYERS = [
    (1280, 1280, 64, 64, 1.0, 1.0),  # attn1.to_q, up_blocks.0
    (1280, 2048, 32, 64, 3.0, 0.5),  # attn2.to_k
    (640, 2048, 16, 32, 0.4, 1.2),  # attn2.to_v, up_blocks.1
    (640, 640, 64, 16, 2.0, 0.3),  # attn1.to_out.0
    (1280, 1280, 16, 16, 0.2, 2.0),
    (640, 640, 32, 32, 1.0, 0.7),
    (1280, 2048, 64, 32, 0.8, 0.8),
    (640, 640, 16, 64, 5.0, 1.0),
    (640, 640, 16, 16, 40.0, 0.5),  # far out: left out of gamma by the 3x-mean filter
]


def heavy_factors(gen, out, inn, rank, magnitude):
    """LoRA factors with a heavy tail (a few strong rows), as trained LoRAs have."""
    up = torch.randn(out, rank, generator=gen) * magnitude * 0.01
    up[torch.randint(0, out, (out // 50,), generator=gen)] *= 8.0
    down = torch.randn(rank, inn, generator=gen) / math.sqrt(inn)
    return up, down


def make_pair(seed=0, layers=SDXL_LAYERS):
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for i, (out, inn, rc, rs, mc, ms) in enumerate(layers):
        up_c, down_c = heavy_factors(gen, out, inn, rc, mc)
        up_s, down_s = heavy_factors(gen, out, inn, rs, ms)
        scale_c, scale_s = 16.0 / rc, 1.0  # kohya alpha 16; diffusers alpha = rank
        geometry = LayerGeometry("linear", out, inn)
        pairs[f"layer{i}"] = (
            LayerDelta(geometry, [LowRankPart(up_c, down_c, scale_c)]),
            LayerDelta(geometry, [LowRankPart(up_s, down_s, scale_s)]),
            dense_dw(up_c, down_c, scale_c), dense_dw(up_s, down_s, scale_s), rc * rs,
        )
    return pairs


def reference_sums(pair):
    """{layer: (top-k sum of |dW_c|, of |dW_s|)} by torch.topk on the dense products."""
    return {name: (topk_sum(dw_c, k), topk_sum(dw_s, k)) for name, (_, _, dw_c, dw_s, k) in pair.items()}


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def oracle(pair):
    """(top-k sums per layer, gamma) of the reference, from the dense products."""
    return reference_sums(pair), reference_gamma([(c, s) for _, _, c, s, _ in pair.values()])


@pytest.fixture(scope="module")
def scores(pair):
    return {name: klora_layer_scores(c, s, name) for name, (c, s, *_) in pair.items()}


# --- Top-K sums -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 64 * 64, 100_000])
def test_topk_abs_sum_of_a_dense_weight_equals_torch_topk(k, monkeypatch):
    torch.manual_seed(3)
    dw = torch.randn(1280, 2048) * torch.rand(1280, 1) ** 4  # rows of very different scale
    monkeypatch.setattr(fusion_rules, "CHUNK_ELEMENTS", 300_000)  # several chunks
    assert topk_abs_sum(dw, k) == pytest.approx(topk_sum(dw.double(), k), rel=1e-6)
    assert topk_abs_sum(dw, 10 ** 9) == pytest.approx(float(dw.double().abs().sum()), rel=1e-6)


@pytest.mark.parametrize("out,inn,rank", [(1280, 1280, 64), (640, 2048, 16), (3072, 12288, 32)])
def test_low_rank_topk_equals_topk_of_the_dense_product(out, inn, rank):
    gen = torch.Generator().manual_seed(out + inn)
    up, down = heavy_factors(gen, out, inn, rank, 1.0)
    scale = 16.0 / rank
    stats = low_rank_abs_stats(up, down, rank * 32, scale)
    dw = dense_dw(up, down, scale)
    assert stats.k == rank * 32 and stats.numel == out * inn
    assert stats.topk_sum == pytest.approx(topk_sum(dw, rank * 32), rel=1e-5)
    assert stats.abs_sum == pytest.approx(float(dw.abs().sum()), rel=1e-5)
    if out * inn > fusion_rules.CHUNK_ELEMENTS:
        assert out * inn // fusion_rules.CHUNK_ELEMENTS >= 8  # the Flux size really ran in chunks


@pytest.mark.parametrize("with_mid", [False, True])
def test_conv_topk_equals_topk_of_the_kernel_the_layer_applies(with_mid):
    gen = torch.Generator().manual_seed(11)
    out, inn, rank = 640, 320, 16
    up = torch.randn(out, rank, 1, 1, generator=gen) * 0.02
    if with_mid:  # LoCon with a Tucker core
        down = torch.randn(rank, inn, 1, 1, generator=gen) / math.sqrt(inn)
        mid = torch.randn(rank, rank, 3, 3, generator=gen) / 3.0
    else:
        down, mid = torch.randn(rank, inn, 3, 3, generator=gen) / math.sqrt(inn * 9), None
    geometry = LayerGeometry("conv", out, inn, (3, 3), (1, 1), (1, 1), (1, 1))
    delta = LayerDelta(geometry, [LowRankPart(up, down, 0.5, mid)])
    dw = dense_dw(up, down, 0.5, mid)
    x = torch.randn(1, inn, 12, 12, generator=gen)
    # the oracle's kernel is what the layer really adds: conv(x, dW) == the delta applied to x
    assert torch.allclose(F.conv2d(x.double(), dw, padding=1), delta(x).double(), atol=1e-4)
    k = rank * rank
    stats = low_rank_abs_stats(up, down, k, 0.5, mid)
    assert stats.topk_sum == pytest.approx(topk_sum(dw, k), rel=1e-5)
    assert layer_abs_stats(delta, k).topk_sum == pytest.approx(topk_sum(dw, k), rel=1e-5)


def test_fused_layer_rows_and_slices_equal_the_dense_rows():
    """Flux double block qkv (9216 x 3072): diffusers q, k, v parts at their rows, a dense part, slices."""
    gen = torch.Generator().manual_seed(5)
    width, rank = 3072, 16
    geometry = LayerGeometry("linear", 3 * width, width)
    parts, dense = [], torch.zeros(3 * width, width, dtype=torch.float64)
    for i, magnitude in enumerate((0.5, 2.0, 1.0)):
        up, down = heavy_factors(gen, width, width, rank, magnitude)
        parts.append(LowRankPart(up, down, 1.0, rows=(i * width, width)))
        dense[i * width:(i + 1) * width] = dense_dw(up, down, 1.0)
    extra = torch.randn(3 * width, width, generator=gen) * 1e-4
    delta = LayerDelta(geometry, parts, [DensePart(extra.clone())])
    dense += extra.double()
    k = rank * rank
    assert layer_abs_stats(delta, k).topk_sum == pytest.approx(topk_sum(dense, k), rel=1e-5)
    for i in range(3):
        rows = (i * width, width)
        assert layer_abs_stats(delta, k, rows).topk_sum == pytest.approx(
            topk_sum(dense[i * width:(i + 1) * width], k), rel=1e-5)
    assert torch.equal(delta.dense[0].weight, extra)  # read, never modified
    only_low_rank = LayerDelta(geometry, parts)
    assert fusion_rules.delta_rank(only_low_rank, (width, width)) == rank  # the slice's own LoRA
    assert fusion_rules.delta_rank(only_low_rank) == 3 * rank
    with pytest.raises(ValueError, match="no rank"):
        fusion_rules.delta_rank(delta, layer="double_blocks.0.img_attn.qkv")


def test_layer_scores_use_k_rank_c_times_rank_s(pair, scores):
    for name, (_, _, dw_c, dw_s, k) in pair.items():
        assert scores[name].k == k
        assert scores[name].subject_topk == pytest.approx(topk_sum(dw_c, k), rel=1e-5)
        assert scores[name].style_topk == pytest.approx(topk_sum(dw_s, k), rel=1e-5)


# --- the K-LoRA rule --------------------------------------------------------------------------------

def test_gamma_is_the_reference_mean_ratio_without_outliers(pair, scores):
    pairs = [(dw_c, dw_s) for _, _, dw_c, dw_s, _ in pair.values()]
    assert klora_gamma(scores.values()) == pytest.approx(reference_gamma(pairs), rel=1e-5)
    ratios = [float(c.abs().sum() / s.abs().sum()) for c, s in pairs]
    assert any(r >= 3 * sum(ratios) / len(ratios) for r in ratios)  # the outlier filter mattered here


@pytest.mark.parametrize("preset", ["s", "s*"])
@pytest.mark.parametrize("steps", [20, 28, 50])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_klora_choice_equals_the_rule_written_out(pair, oracle, scores, preset, steps, schedule):
    sigmas = SCHEDULES[schedule](steps)
    sums, gamma = oracle
    names = list(pair)
    rule = KLoraRule(scores, preset)
    ordered = KLoraRule(scores, preset, layer_order=names)
    seen = set()
    for i in range(steps):
        position = schedule_position(float(sigmas[i]), sigmas)
        assert position == i
        for j, name in enumerate(names):
            # without a layer order every layer of step i sees t = i / N; with one, t = (i + j/L) / N
            expected = reference_choice(*sums[name], gamma, i, steps, preset)
            assert rule.choose_subject(name, position, steps) == expected, (name, i)
            total = steps * len(names)
            expected = reference_choice(*sums[name], gamma, (i * len(names) + j + 1) % total, total, preset)
            assert ordered.choose_subject(name, position, steps) == expected, (name, i)
            seen.add(expected)
    assert seen == {True, False}


@pytest.mark.parametrize("preset", ["s", "s*"])
@pytest.mark.parametrize("steps,sigmas", [(50, karras(50, 0.0292, 14.6146)), (28, diffusers_flux(28))])
def test_klora_reproduces_the_reference_global_counter(pair, oracle, scores, preset, steps, sigmas):
    """klora.py: every K-LoRA layer call does glo_count += 1, t = glo_count % sum_timesteps, with
    sum_timesteps = layers per forward x steps (SDXL 560 x 50 = 28000, Flux 190 x 28); two images."""
    names = list(pair)
    sum_timesteps = len(names) * steps
    sums, gamma = oracle
    rule = KLoraRule(scores, preset, layer_order=names)
    glo_count, flips = 0, 0
    for _image in range(2):
        for i in range(steps):
            position = schedule_position(float(sigmas[i]), sigmas)
            for name in names:
                glo_count += 1
                expected = reference_choice(*sums[name], gamma, glo_count % sum_timesteps, sum_timesteps, preset)
                assert rule.choose_subject(name, position, steps) == expected, (name, i)
                flips += expected != rule.choose_subject(name, position + 1, steps)
    assert flips > 0  # the choice does change with time


def test_same_fraction_of_denoising_same_decision(scores):
    rule = KLoraRule(scores, "s")
    for i in range(20):
        assert rule.choices(i, 20) == rule.choices(2 * i, 40) == rule.choices(5 * i, 100)
    # a sampler's intermediate evaluation between two schedule sigmas (dpm_2: the geometric mean)
    sigmas = karras(20)
    mid = math.sqrt(float(sigmas[6]) * float(sigmas[7]))
    assert schedule_position(mid, sigmas) == pytest.approx(6.5)
    assert rule.choices(schedule_position(mid, sigmas), 20) == rule.choices(13, 40)


def test_no_topk_runs_while_sampling(scores, monkeypatch):
    rule = KLoraRule(scores, "s*")
    calls = []

    def counting_topk(*args, **kwargs):
        calls.append(1)
        raise AssertionError("torch.topk ran during sampling")

    monkeypatch.setattr(torch, "topk", counting_topk)
    monkeypatch.setattr(torch.Tensor, "topk", counting_topk)
    sigmas = flow_shift(30)
    for i in range(30):
        rule.choices(schedule_position(float(sigmas[i]), sigmas), 30)
    assert calls == []


def test_strengths_scale_the_lora_not_the_choice():
    """gamma divides S_c by the subject's overall size and multiplies in the style's: a LoRA-wide
    strength cancels out of S_c / gamma > S(t) S_s."""
    pair = make_pair(seed=4, layers=SDXL_LAYERS[:4])
    base = {n: klora_layer_scores(c, s, n) for n, (c, s, *_) in pair.items()}
    scaled = {}
    for name, (c, s, *_) in pair.items():
        c2 = LayerDelta(c.geometry, [LowRankPart(p.up, p.down, p.scale * 0.37) for p in c.low_rank])
        s2 = LayerDelta(s.geometry, [LowRankPart(p.up, p.down, p.scale * 2.5) for p in s.low_rank])
        scaled[name] = klora_layer_scores(c2, s2, name)
    for preset in ("s", "s*"):
        a, b = KLoraRule(base, preset), KLoraRule(scaled, preset)
        assert all(a.choices(i, 30) == b.choices(i, 30) for i in range(30))


def test_presets_time_scale():
    assert klora_time_scale(0.0, "s") == pytest.approx(0.5)
    assert klora_time_scale(0.5, "s") == pytest.approx(1.25)
    assert klora_time_scale(0.0, "s*") == pytest.approx(1.275)
    assert klora_time_scale(0.1, "s*") == pytest.approx(1.425)
    assert klora_time_scale(0.2, "s*") == pytest.approx(0.075)  # wrapped: 1.575 mod 1.5
    assert klora_time(27, 28, 1.0) == 0.0  # the reference's counter wraps on the very last call
    with pytest.raises(ValueError, match="preset"):
        KLoraRule({}, "t", gamma=1.0)


def test_schedule_position_between_and_off_the_schedule():
    sigmas = torch.tensor([14.6, 5.0, 1.0, 0.1, 0.0])
    assert schedule_position(20.0, sigmas) == 0.0
    assert schedule_position(1.0, sigmas) == 2.0
    assert schedule_position(math.sqrt(5.0), sigmas) == pytest.approx(1.5)
    assert schedule_position(0.05, sigmas) == pytest.approx(3.5)  # last interval, linear to 0
    assert schedule_position(0.0, sigmas) == 4.0
    assert schedule_position(4.9, [14.6, 5.0, 1.0, 8.0, 0.5, 0.0]) == 1.0  # a restart: the nearest sigma


def test_unknown_layer_and_rankless_layer_are_named(scores):
    with pytest.raises(KeyError, match="output_blocks.7.1"):
        KLoraRule(scores).choose_subject("diffusion_model.output_blocks.7.1.proj_in", 0, 20)
    geometry = LayerGeometry("linear", 640, 640)
    loha = LayerDelta(geometry, dense=[DensePart(torch.randn(640, 640))])
    lora = LayerDelta(geometry, [LowRankPart(torch.randn(640, 8), torch.randn(8, 640), 1.0)])
    with pytest.raises(ValueError, match="input_blocks.4.1.proj_in.*style"):
        klora_layer_scores(lora, loha, "input_blocks.4.1.proj_in")
    before = loha.dense[0].weight.clone()
    explicit = klora_layer_scores(lora, loha, "input_blocks.4.1.proj_in", k=64)
    assert explicit.style_topk == pytest.approx(topk_sum(before.double(), 64), rel=1e-5)
    assert torch.equal(loha.dense[0].weight, before)  # the LoRA's tensors are read, never modified


# --- B-LoRA ---------------------------------------------------------------------------------------

def sdxl_unet_paths():
    """Every Linear/Conv module path of ComfyUI's SDXL UNet attention blocks and res blocks."""
    paths = ["diffusion_model.input_blocks.0.0"]
    transformer = [f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")]
    transformer += ["ff.net.0.proj", "ff.net.2"]

    def attention(prefix, depth):
        out = [f"{prefix}.proj_in", f"{prefix}.proj_out"]
        return out + [f"{prefix}.transformer_blocks.{t}.{m}" for t in range(depth) for m in transformer]

    def res(prefix):
        return [f"{prefix}.in_layers.2", f"{prefix}.emb_layers.1", f"{prefix}.out_layers.3"]

    for block, depth in ((1, 0), (2, 0), (4, 2), (5, 2), (7, 10), (8, 10)):
        paths += res(f"diffusion_model.input_blocks.{block}.0")
        paths += attention(f"diffusion_model.input_blocks.{block}.1", depth) if depth else []
    paths += res("diffusion_model.middle_block.0") + attention("diffusion_model.middle_block.1", 10)
    for block in range(9):
        paths += res(f"diffusion_model.output_blocks.{block}.0")
        depth = 10 if block < 3 else 2 if block < 6 else 0
        paths += attention(f"diffusion_model.output_blocks.{block}.1", depth) if depth else []
    paths += ["diffusion_model.output_blocks.2.2.conv", "diffusion_model.output_blocks.5.2.conv"]
    return paths


def test_b_lora_keeps_exactly_the_content_and_style_blocks():
    paths = sdxl_unet_paths()
    routed = {path: b_lora_routing(path, "SDXL") for path in paths}
    subject = {p for p, r in routed.items() if r == (SUBJECT,)}
    style = {p for p, r in routed.items() if r == (STYLE,)}
    assert subject == {p for p in paths if p.startswith("diffusion_model.output_blocks.0.1.")}
    assert style == {p for p in paths if p.startswith("diffusion_model.output_blocks.1.1.")}
    assert len(subject) == len(style) == 2 + 10 * 10  # proj_in, proj_out, 10 blocks x 10 layers
    assert all(r == () for p, r in routed.items() if p not in subject | style)


def test_b_lora_reads_diffusers_and_kohya_keys():
    assert b_lora_routing("unet.up_blocks.0.attentions.0.transformer_blocks.3.attn2.to_k.lora.down.weight",
                          "SDXL") == (SUBJECT,)
    assert b_lora_routing("unet.up_blocks.0.attentions.1.proj_out.lora_A.weight", "sdxl") == (STYLE,)
    assert b_lora_routing("unet.up_blocks.0.attentions.2.proj_out.lora_A.weight", "SDXL") == ()
    assert b_lora_routing("unet.up_blocks.1.attentions.0.proj_in.lora_A.weight", "SDXL") == ()
    assert b_lora_routing("lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2.lora_up.weight",
                          "SDXL") == (SUBJECT,)
    assert b_lora_routing("lora_unet_output_blocks_1_1_proj_in.alpha", "SDXL") == (STYLE,)
    assert b_lora_routing("lora_unet_output_blocks_1_0_in_layers_2.lora_up.weight", "SDXL") == ()
    assert b_lora_routing("lora_unet_up_blocks_0_attentions_1_proj_in.lora_down.weight", "SDXL") == (STYLE,)


@pytest.mark.parametrize("family", ["SD1.5", "Flux", "SD3", "SD1.5 or SDXL", "unknown"])
def test_b_lora_refuses_other_architectures(family):
    with pytest.raises(ValueError, match=f"SDXL only.*model is {re.escape(family)}"):
        b_lora_routing("diffusion_model.output_blocks.0.1.proj_in", family)

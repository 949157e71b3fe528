import math

import pytest
import torch

from plora_pack.plora_core import divergence
from plora_pack.plora_core.divergence import (DIVERGENCES, cosine_distance, dot_drop, get_divergence,
                                              get_shift_divergence, js_divergence, kl_divergence)


def test_kl_matches_closed_form_for_two_channel_distributions():
    # softmax([0, log 3]) = (1/4, 3/4); softmax([0, 0]) = (1/2, 1/2)
    tuned = torch.tensor([[[0.0, math.log(3.0)]]])
    base = torch.zeros(1, 1, 2)
    p, q = (0.25, 0.75), (0.5, 0.5)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl_divergence(tuned, base, -1).item() == pytest.approx(expected, rel=1e-6)


def test_js_matches_closed_form():
    tuned = torch.tensor([[[0.0, math.log(3.0)]]])
    base = torch.zeros(1, 1, 2)
    p, q = (0.25, 0.75), (0.5, 0.5)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m))
    expected += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    assert js_divergence(tuned, base, -1).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_distance_of_orthogonal_and_equal_vectors():
    base = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    tuned = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])  # orthogonal (1), parallel (0)
    assert cosine_distance(tuned, base, -1).item() == pytest.approx(0.5, abs=1e-6)


def test_cosine_distance_of_a_tiny_orthogonal_move_is_exact():
    # F = (n, 0), F_hat = (n, e): 1 - cos = 1 - n / sqrt(n^2 + e^2), ~ e^2 / (2 n^2) = 5e-11 here,
    # below float32's resolution of cos itself
    n, e = 100.0, 1e-3
    x = (e / n) ** 2
    expected = x / (math.sqrt(1 + x) * (1 + math.sqrt(1 + x)))
    value = cosine_distance(torch.tensor([[[n, e]]]), torch.tensor([[[n, 0.0]]]), -1).item()
    assert value == pytest.approx(expected, rel=1e-5)


def test_cosine_distance_of_opposite_and_zero_vectors():
    base = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 1.0]]])
    tuned = torch.tensor([[[-3.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    # opposite: 2; from a zero base: 1; nothing moved: 0; moved to zero: 1
    assert cosine_distance(tuned, base, -1).item() == pytest.approx((2 + 1 + 0 + 1) / 4, rel=1e-6)


def test_dot_criterion_is_the_drop_of_the_dot_product_with_the_base():
    base = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    tuned = torch.tensor([[[0.5, 2.0], [3.0, 5.0]]])
    # F.F - F_hat.F per token: (5 - 4.5) and (9 - 9), averaged
    assert dot_drop(tuned, base, -1).item() == pytest.approx(0.25, rel=1e-6)
    assert "dot" in DIVERGENCES


def test_divergence_is_per_sample_and_averages_tokens():
    torch.manual_seed(0)
    base = torch.randn(3, 5, 7)
    tuned = base.clone()
    tuned[1] += torch.randn(5, 7)
    d = kl_divergence(tuned, base, -1)
    assert d.shape == (3,)
    assert d[0] == 0 and d[2] == 0 and d[1] > 0
    manual = torch.stack([kl_divergence(tuned[1:2, t:t + 1], base[1:2, t:t + 1], -1) for t in range(5)]).mean()
    assert d[1].item() == pytest.approx(manual.item(), rel=1e-5)


def test_conv_layout_uses_channel_dim_one():
    torch.manual_seed(0)
    base = torch.randn(2, 4, 3, 3)
    tuned = base + torch.randn(2, 4, 3, 3)
    as_tokens = kl_divergence(tuned.permute(0, 2, 3, 1), base.permute(0, 2, 3, 1), -1)
    assert torch.allclose(kl_divergence(tuned, base, 1), as_tokens, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_half_precision_inputs_are_computed_in_float32(name):
    torch.manual_seed(0)
    base = torch.randn(2, 8, 16) * 30
    delta = torch.randn(2, 8, 16)
    for dtype in (torch.float16, torch.bfloat16):
        d = get_shift_divergence(name)(base.to(dtype), (delta.to(dtype),), -1)[0]
        assert d.dtype == torch.float32 and d.shape == (2,) and torch.isfinite(d).all()


def test_unknown_criterion_names_the_valid_ones():
    with pytest.raises(ValueError, match="cosine.*dot"):
        get_divergence("wasserstein")
    with pytest.raises(ValueError, match="dot"):
        get_shift_divergence("wasserstein")


def kl64(base, delta, channel_dim=-1):
    log_p = torch.log_softmax(base.double() + delta.double(), channel_dim)
    log_q = torch.log_softmax(base.double(), channel_dim)
    per_token = (log_p.exp() * (log_p - log_q)).sum(channel_dim)
    return per_token.reshape(per_token.shape[0], -1).mean(1)


def test_kahan_expm1_and_log1p_keep_float32_accuracy():
    x = torch.cat([torch.logspace(-12, math.log10(60.0), 2000), -torch.logspace(-12, math.log10(60.0), 2000),
                   torch.zeros(1)])
    out, scratch = torch.empty_like(x), torch.empty_like(x)
    expected = torch.expm1(x.double())
    assert torch.allclose(divergence.expm1(x, out, scratch).double(), expected, rtol=4e-7, atol=0)
    y = torch.cat([torch.logspace(-12, 6, 2000), -torch.logspace(-12, math.log10(0.999), 2000), torch.zeros(1)])
    out, scratch = torch.empty_like(y), torch.empty_like(y)
    assert torch.allclose(divergence.log1p(y, out, scratch).double(), torch.log1p(y.double()), rtol=4e-7, atol=0)


def test_moment_series_and_elementwise_expm1_give_the_same_kl(monkeypatch):
    torch.manual_seed(5)
    base, delta = torch.randn(3, 64, 320) * 20, torch.randn(3, 64, 320) * 0.2  # |v| up to ~1: 8-10 moments
    series = get_shift_divergence("kl")(base, (delta,), -1)[0]
    monkeypatch.setattr(divergence, "SERIES_MAX_MOMENTS", 1)  # no series: elementwise expm1
    elementwise = get_shift_divergence("kl")(base, (delta,), -1)[0]
    reference = kl64(base, delta)
    assert torch.allclose(series.double(), reference, rtol=1e-4)
    assert torch.allclose(elementwise.double(), reference, rtol=1e-5)


@pytest.mark.parametrize("name", ["kl", "js"])
def test_deltas_beyond_float32_exponents_fall_back_to_float64(name):
    torch.manual_seed(6)
    base = torch.randn(2, 16, 64) * 40
    delta = torch.randn(2, 16, 64) * 30  # |v| > 60 somewhere: e^v would leave float32's range
    value = get_shift_divergence(name)(base, (delta,), -1)[0]
    if name == "kl":
        reference = kl64(base, delta)
    else:
        log_p = torch.log_softmax(base.double() + delta.double(), -1)
        log_q = torch.log_softmax(base.double(), -1)
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        reference = (0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1))
        reference = reference.mean(1)
    assert torch.allclose(value.double(), reference, rtol=1e-5)


def test_js_where_the_tuned_distribution_vanishes_on_a_channel():
    base = torch.zeros(1, 1, 4)
    delta = torch.tensor([[[-55.0, 0.0, 0.0, 0.0]]])  # p_0 / q_0 = e^-55: t = p / q - 1 rounds to -1
    value = js_divergence(base + delta, base, -1).item()
    p = torch.softmax(delta.double(), -1)[0, 0]
    q = torch.full((4,), 0.25, dtype=torch.float64)
    m = (p + q) / 2
    expected = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "js"])
def test_the_accelerator_path_is_as_accurate(monkeypatch, name):
    """Off the CPU there is no series, no float64 fallback and no chunking: tokens whose v would
    overflow exp are shifted instead (the divergences are shift-invariant). Run that path here."""
    monkeypatch.setattr(divergence, "_accelerated", lambda tensor: True)
    torch.manual_seed(7)
    base, delta = torch.randn(2, 64, 320) * 30, torch.randn(2, 64, 320) * 0.03
    delta[0, 5, 17] = 90.0  # one token far beyond float32's exponent range
    value = get_shift_divergence(name)(base, (delta,), -1)[0]
    log_p = torch.log_softmax(base.double() + delta.double(), -1)
    log_q = torch.log_softmax(base.double(), -1)
    if name == "kl":
        reference = (log_p.exp() * (log_p - log_q)).sum(-1).mean(1)
    else:
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        reference = (0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1))
        reference = reference.mean(1)
    assert torch.allclose(value.double(), reference, rtol=1e-4)

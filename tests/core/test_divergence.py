import math

import pytest
import torch

from plora_core.divergence import cosine_distance, get_divergence, js_divergence, kl_divergence


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


def test_half_precision_inputs_are_computed_in_float32():
    torch.manual_seed(0)
    base = torch.randn(2, 8, 16) * 30
    tuned = base + torch.randn(2, 8, 16)
    d16 = kl_divergence(tuned.to(torch.bfloat16), base.to(torch.bfloat16), -1)
    assert d16.dtype == torch.float32 and torch.isfinite(d16).all()


def test_unknown_criterion_names_the_valid_ones():
    with pytest.raises(ValueError, match="cosine"):
        get_divergence("wasserstein")

import pytest
import torch
import torch.nn.functional as F

from plora_pack.plora_core.deltas import DensePart, LayerDelta, LayerGeometry, LowRankPart, normalise_factors


def test_linear_low_rank_equals_dense_matmul():
    torch.manual_seed(0)
    up, down, x = torch.randn(7, 3), torch.randn(3, 5), torch.randn(2, 4, 5)
    delta = LayerDelta(LayerGeometry("linear", 7, 5), [LowRankPart(up, down, 0.5)])
    assert torch.allclose(delta(x), x @ (0.5 * up @ down).T, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_conv_low_rank_uses_the_layers_stride_padding_dilation(stride, padding, dilation):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    up, down = torch.randn(6, 2, 1, 1), torch.randn(2, 4, 3, 3)
    x = torch.randn(2, 4, 9, 9)
    delta = LayerDelta(LayerGeometry.of_module(conv), [LowRankPart(up, down, 0.7)])
    dense = 0.7 * (up.flatten(1) @ down.flatten(1)).reshape(6, 4, 3, 3)
    assert torch.allclose(delta(x), F.conv2d(x, dense, None, stride, padding, dilation), atol=1e-4)


def test_locon_mid_factor_equals_its_dense_tucker_weight():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    up, down, mid = torch.randn(6, 2, 1, 1), torch.randn(2, 4, 1, 1), torch.randn(2, 2, 3, 3)
    x = torch.randn(1, 4, 8, 8)
    delta = LayerDelta(LayerGeometry.of_module(conv), [LowRankPart(up, down, 1.0, mid)])
    # W[o, i, h, w] = sum_{r, s} up[o, r] mid[r, s, h, w] down[s, i]
    dense = torch.einsum("or,rshw,si->oihw", up.flatten(1), mid, down.flatten(1))
    assert torch.allclose(delta(x), F.conv2d(x, dense, None, 2, 1), atol=1e-4)


def test_row_slices_of_a_fused_layer_land_on_their_rows():
    torch.manual_seed(0)
    geometry = LayerGeometry("linear", 12, 5)  # a fused q|k|v of 4 rows each
    parts = [LowRankPart(torch.randn(4, 2), torch.randn(2, 5), 1.0, rows=(4 * i, 4)) for i in (0, 2)]
    x = torch.randn(3, 5)
    dense = torch.zeros(12, 5)
    dense[0:4] = parts[0].up @ parts[0].down
    dense[8:12] = parts[1].up @ parts[1].down
    assert torch.allclose(LayerDelta(geometry, parts)(x), x @ dense.T, atol=1e-5)


def test_dense_part_and_bias_for_adapters_without_factors():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    weight, bias = torch.randn(5, 3, 3, 3), torch.randn(5)
    x = torch.randn(2, 3, 6, 6)
    delta = LayerDelta(LayerGeometry.of_module(conv), dense=[DensePart(weight)], bias=bias)
    assert torch.allclose(delta(x), F.conv2d(x, weight, bias, 1, 1), atol=1e-4)
    both = LayerDelta(LayerGeometry("linear", 4, 3), [LowRankPart(torch.ones(4, 1), torch.ones(1, 3), 1.0)],
                      [DensePart(torch.eye(4, 3))])
    xl = torch.randn(2, 3)
    assert torch.allclose(both(xl), xl @ (torch.ones(4, 3) + torch.eye(4, 3)).T, atol=1e-5)


def test_factors_follow_the_input_dtype_and_are_cached():
    up, down = torch.randn(4, 2), torch.randn(2, 3)
    delta = LayerDelta(LayerGeometry("linear", 4, 3), [LowRankPart(up, down, 1.0)])
    out = delta(torch.randn(2, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert len(delta._cache) == 1
    delta(torch.randn(2, 3, dtype=torch.bfloat16))
    assert len(delta._cache) == 1


def test_peft_two_dimensional_factors_fit_a_one_by_one_conv():
    conv = torch.nn.Conv2d(8, 6, 1)
    geometry = LayerGeometry.of_module(conv)
    up, down, _ = normalise_factors(geometry, torch.randn(6, 2), torch.randn(2, 8), None, None, "x")
    assert up.shape == (6, 2, 1, 1) and down.shape == (2, 8, 1, 1)


def test_mismatched_factors_name_the_layer():
    with pytest.raises(ValueError, match=r"blocks\.3\.attn.*another base model"):
        normalise_factors(LayerGeometry("linear", 8, 16), torch.randn(8, 4), torch.randn(4, 32), None, None,
                          "blocks.3.attn")


def test_mismatched_factors_raise_a_typed_error_that_carries_the_layer_and_the_lora():
    from plora_pack.plora_core.deltas import LayerMismatch

    with pytest.raises(LayerMismatch) as raised:
        normalise_factors(LayerGeometry("linear", 8, 16), torch.randn(8, 4), torch.randn(4, 32), None, None,
                          "blocks.3.attn", "dog.safetensors")
    assert (raised.value.layer, raised.value.lora) == ("blocks.3.attn", "dog.safetensors")

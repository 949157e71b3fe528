"""Shared-layer adapters on quantized weights (fp8 / nvfp4 / int8 checkpoints in current ComfyUI).

LoHa, LoKr, DoRA and full diffs have no factored form: their delta is W(patched) - W0, which needs
W0. On a quantized W0 (a tensor subclass that stays quantized under `.to` and `clone`) it must be
dequantized first, else the patch lands on a temporary and the delta is silently 0. The oracle is
the same model with plain weights holding exactly the dequantized values.
"""

import pytest
import torch
from support.host_support import module_shapes, sample, tiny_sd15
from support.quantized_standin import QuantizedStandIn, dequantize_layers, quantize_layers
from test_gate_oracle import CONV, LINEAR, write_adapter

KINDS = ["loha", "lokr", "dora", "full_diff"]


def test_the_stand_in_behaves_like_a_quantized_weight():
    weight = torch.randn(64, 32) * 40
    quantized = QuantizedStandIn.quantize(weight)
    assert isinstance(quantized.to(torch.float32), QuantizedStandIn) and isinstance(quantized.clone(), QuantizedStandIn)
    temporary = quantized.to(torch.float32)
    temporary += 1.0  # lands on a dequantized temporary
    assert torch.equal(temporary.dequantize(), quantized.dequantize())
    assert torch.allclose(quantized.dequantize(), weight, atol=weight.abs().max() / 127)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_adapters_on_quantized_shared_layers_equal_the_plain_weight_result(pack, tmp_path, kind):
    paths = [LINEAR, CONV]
    plain, quantized = tiny_sd15(), tiny_sd15()
    shapes = module_shapes(plain, paths)
    dequantize_layers(plain, paths)
    quantize_layers(quantized, paths)
    assert isinstance(quantized.model.get_submodule(LINEAR).weight, QuantizedStandIn)
    subject = write_adapter(tmp_path / f"{kind}_subject.safetensors", kind, shapes, seed=1)
    style = write_adapter(tmp_path / f"{kind}_style.safetensors", kind, shapes, seed=2)

    results = {}
    for name, model in (("plain", plain), ("quantized", quantized)):
        pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
        patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
        gates = pack.glue.gate.gated_layers(patched)
        assert sorted(gates) == sorted(paths)
        results[name] = ({path: [part.weight for part in gate.subject.dense + gate.style.dense]
                          for path, gate in gates.items()}, sample(patched))

    for path in paths:
        for plain_delta, quantized_delta in zip(results["plain"][0][path], results["quantized"][0][path]):
            assert plain_delta.abs().max() > 0
            assert torch.allclose(quantized_delta, plain_delta, rtol=1e-5, atol=1e-6 * plain_delta.abs().max())
    assert torch.allclose(results["quantized"][1], results["plain"][1], rtol=1e-4, atol=1e-4)

"""The gate checked against ComfyUI's own merge, for every adapter type it reads.

With style_bias = 0 the subject wins every comparison (d_c >= 0 * d_s), so when both LoRAs
touch the same layers the gated model must equal LoraLoader(subject) alone; with a huge
style_bias it must equal LoraLoader(style) alone. The oracle is ComfyUI's
`load_lora_for_models` (what LoraLoader runs), independent of the pack's delta code.
"""

import comfy.sd
import comfy.utils
import pytest
import torch
from support.host_support import kohya_key, module_shapes, sample, tiny_sd15
from safetensors.torch import save_file

LINEAR = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
CONV = "diffusion_model.input_blocks.1.0.in_layers.2"  # 3x3
RANK = 4


def adapter_tensors(kind: str, key: str, shape: tuple, generator: torch.Generator) -> dict:
    """One layer's tensors of a LoRA file of the given adapter type, in kohya/LyCORIS naming."""
    out_dim, in_dim, kernel = shape[0], shape[1], shape[2:]
    flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)

    def rand(*size, scale=0.3):
        return torch.randn(*size, generator=generator) * scale

    if kind in ("lora", "dora"):  # alpha != rank, so the alpha / rank scale is exercised
        tensors = {f"{key}.lora_down.weight": rand(RANK, in_dim, *kernel),
                   f"{key}.lora_up.weight": rand(out_dim, RANK, *([1] * len(kernel))),
                   f"{key}.alpha": torch.tensor(2.5)}
        if kind == "dora":
            tensors[f"{key}.dora_scale"] = rand(out_dim, *([1] * (len(shape) - 1)), scale=0.2).abs() + 0.5
        return tensors
    if kind == "locon_mid":  # Tucker: 1x1 down, kxk mid, 1x1 up
        return {f"{key}.lora_down.weight": rand(RANK, in_dim, 1, 1),
                f"{key}.lora_mid.weight": rand(RANK, RANK, *kernel),
                f"{key}.lora_up.weight": rand(out_dim, RANK, 1, 1), f"{key}.alpha": torch.tensor(3.0)}
    if kind == "loha":
        return {f"{key}.hada_w1_a": rand(out_dim, RANK), f"{key}.hada_w1_b": rand(RANK, flat_in),
                f"{key}.hada_w2_a": rand(out_dim, RANK), f"{key}.hada_w2_b": rand(RANK, flat_in),
                f"{key}.alpha": torch.tensor(2.0)}
    if kind == "lokr":
        return {f"{key}.lokr_w1": rand(4, 2), f"{key}.lokr_w2": rand(out_dim // 4, flat_in // 2, scale=0.1)}
    if kind == "full_diff":  # a bias diff too on the conv (attention projections have no bias)
        tensors = {f"{key}.diff": rand(*shape, scale=0.02)}
        return {**tensors, f"{key}.diff_b": rand(out_dim, scale=0.02)} if kernel else tensors
    raise ValueError(kind)


def write_adapter(file, kind: str, shapes: dict, seed: int):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, shape in shapes.items():
        tensors.update(adapter_tensors(kind, kohya_key(path), shape, generator))
    save_file(tensors, str(file))
    return file


def comfy_lora_loader(model, file):
    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(file)), 1.0, 0.0)[0]


KINDS = ["lora", "locon_mid", "loha", "lokr", "dora", "full_diff"]


@pytest.mark.parametrize("kind", KINDS)
def test_style_bias_zero_is_the_subject_alone_and_a_huge_one_the_style_alone(pack, tmp_path, kind):
    model = tiny_sd15()
    shapes = module_shapes(model, [CONV] if kind == "locon_mid" else [LINEAR, CONV])
    subject = write_adapter(tmp_path / f"subject_{kind}.safetensors", kind, shapes, seed=1)
    style = write_adapter(tmp_path / f"style_{kind}.safetensors", kind, shapes, seed=2)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patcher = pack.nodes.PLoRAModelPatcher()

    subject_only, style_only = sample(comfy_lora_loader(model, subject)), sample(comfy_lora_loader(model, style))
    assert not torch.allclose(subject_only, style_only, atol=1e-3)  # the two oracles can be told apart

    gated_subject = patcher.patch(model, pair, "kl", 0.0, 0.0, 1.0)[0]
    assert sorted(pack.glue.gate.gated_layers(gated_subject)) == sorted(shapes)
    assert torch.allclose(sample(gated_subject), subject_only, rtol=1e-4, atol=1e-5)

    # past the node's input range (0-10), so through the function behind it
    gated_style = pack.glue.gate.build_gated_model(model, pair, "kl", style_bias=1e20)
    assert torch.allclose(sample(gated_style), style_only, rtol=1e-4, atol=1e-5)

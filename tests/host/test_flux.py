"""Flux: ai-toolkit/diffusers LoRAs target q, k, v separately; Flux fuses them into one qkv Linear."""

import pytest
import torch
from support.host_support import flux_conditioning, tiny_flux
from safetensors.torch import save_file

HIDDEN = 64


def ai_toolkit_lora(file, seed, rank=4):
    """q/k/v of the double block's image attention, and q/k/v + proj_mlp of the single block."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.proj_mlp"]
    for name in names:
        out_dim = 4 * HIDDEN if name.endswith("proj_mlp") else HIDDEN
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=generator) * 0.3
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator) * 0.3
    save_file(tensors, str(file))
    return file


def flux_sample(model_patcher, seed=0):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model_patcher, noise, 3, 1.0, "euler", "simple", flux_conditioning(1),
                               flux_conditioning(2), latent, seed=seed, disable_pbar=True)


def test_flux_fused_layers_are_gated_with_row_slices(pack, tmp_path):
    model = tiny_flux()
    subject = ai_toolkit_lora(tmp_path / "subject_flux.safetensors", seed=1)
    style = ai_toolkit_lora(tmp_path / "style_flux.safetensors", seed=2)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    gated = sorted(pack.glue.gate.gated_layers(patched))
    assert gated == ["diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.single_blocks.0.linear1"]
    parts = pack.glue.gate.gated_layers(patched)["diffusion_model.single_blocks.0.linear1"].subject.low_rank
    assert sorted(p.rows for p in parts) == [(0, HIDDEN), (2 * HIDDEN, HIDDEN), (3 * HIDDEN, 4 * HIDDEN)]
    fused = flux_sample(patched)
    assert torch.isfinite(fused).all()
    assert not torch.allclose(fused, flux_sample(model), atol=1e-4)
    state = pack.glue.gate.gate_state_of(patched)
    assert state.recorder.steps() == [0, 1, 2]
    # one decision per row slice, as the paper's diffusers Flux has separate layers
    qkv, linear1 = "diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.single_blocks.0.linear1"
    assert state.recorder.layers() == [f"{qkv}[to_q]", f"{qkv}[to_k]", f"{qkv}[to_v]", f"{linear1}[to_q]",
                                       f"{linear1}[to_k]", f"{linear1}[to_v]", f"{linear1}[proj_mlp]"]


def single_projection_lora(file, name, seed, rank=4):
    """A diffusers-format Flux LoRA on one projection of the double block's image attention."""
    generator = torch.Generator().manual_seed(seed)
    key = f"transformer.transformer_blocks.0.attn.{name}"
    save_file({f"{key}.lora_A.weight": torch.randn(rank, HIDDEN, generator=generator),
               f"{key}.lora_B.weight": torch.randn(HIDDEN, rank, generator=generator)}, str(file))
    return file


def test_subject_on_q_and_style_on_v_of_one_fused_layer_are_both_applied(pack, tmp_path):
    """Gated as one unit, the fused qkv would pass on only one LoRA; gated per slice, q takes the
    subject's rows and v the style's, which is exactly both LoRAs merged (they touch disjoint rows)."""
    model = tiny_flux()
    subject = single_projection_lora(tmp_path / "q.safetensors", "to_q", seed=4)
    style = single_projection_lora(tmp_path / "v.safetensors", "to_v", seed=5)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    assert list(pack.glue.gate.gated_layers(patched)) == ["diffusion_model.double_blocks.0.img_attn.qkv"]

    import comfy.sd
    from plora_pack.plora_core.lora_file import read_lora_file

    both = model
    for file in (subject, style):  # ComfyUI's own merge, as two LoraLoaders
        both = comfy.sd.load_lora_for_models(both, None, read_lora_file(str(file)).tensors, 1.0, 0.0)[0]
    fused, merged, base = flux_sample(patched), flux_sample(both), flux_sample(model)
    assert not torch.allclose(merged, base, atol=1e-3)
    assert torch.allclose(fused, merged, atol=1e-4, rtol=1e-4)
    state = pack.glue.gate.gate_state_of(patched)
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    for step in state.recorder.steps():
        assert bool(state.recorder.decisions[(step, f"{qkv}[to_q]")].all())  # the subject's rows
        assert not bool(state.recorder.decisions[(step, f"{qkv}[to_v]")].any())  # the style's rows


@pytest.mark.parametrize("dim", [0])
def test_flux_row_slice_delta_equals_the_dense_merge(pack, tmp_path, dim):
    """The gate's on-the-fly delta on a fused layer equals what add_patches merges into the weight."""
    import comfy.utils

    model = tiny_flux()
    lora = ai_toolkit_lora(tmp_path / "one.safetensors", seed=3)
    from plora_pack.glue.gate import LoraChoice, layer_delta
    from plora_pack.glue.lora_mapping import map_lora_onto_model
    from plora_pack.plora_core.deltas import LayerGeometry
    from plora_pack.plora_core.lora_file import read_lora_file

    file = read_lora_file(str(lora))
    mapped = map_lora_onto_model(model, file)
    path = "diffusion_model.single_blocks.0.linear1"
    module = comfy.utils.get_attr(model.model, path)
    delta = layer_delta(mapped.modules[path], LoraChoice(file, 0.8), LayerGeometry.of_module(module), module)
    merged = model.clone()
    merged.add_patches(mapped.raw_patches, 0.8)
    merged.patch_model(torch.device("cpu"))
    try:
        dense = comfy.utils.get_attr(merged.model, path).weight.detach().clone()
    finally:
        merged.unpatch_model(torch.device("cpu"))
    x = torch.randn(2, 5, HIDDEN)
    assert torch.allclose(delta(x), x @ (dense - module.weight).T, atol=1e-4)

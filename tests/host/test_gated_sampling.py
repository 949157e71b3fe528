"""End to end in ComfyUI's sampler: the gate on a tiny SD1.5 UNet with kohya + peft LoRA files."""

import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import pytest
import torch
from support.host_support import (attention_paths, module_shapes, sample, tiny_sd15, write_kohya_lora,
                          write_peft_lora)

STEPS = 4


@pytest.fixture
def setup(tmp_path, pack):
    model = tiny_sd15()
    attention = attention_paths(model)
    extra_subject = ["diffusion_model.input_blocks.1.1.proj_in", "diffusion_model.input_blocks.1.0.in_layers.2"]
    extra_style = ["diffusion_model.output_blocks.3.1.proj_out"]
    subject_file = write_kohya_lora(tmp_path / "dog.safetensors", module_shapes(model, attention + extra_subject))
    style_shapes = module_shapes(model, attention + extra_style)
    style_file = write_peft_lora(tmp_path / "watercolour.safetensors", model, style_shapes)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject_file), 1.0, str(style_file), 1.0)
    return model, pair, attention, subject_file, style_file


def lora_loader(model, file, strength=1.0):
    """A direct merge, as LoraLoader does (add_patches), with the pack's key map.

    ComfyUI's own LoraLoader does not read plain peft attention names (`attn1.to_q`), so the
    style file goes through the pack's mapping; the kohya file gives the same either way.
    """
    from plora_pack.glue.lora_mapping import map_lora_onto_model
    from plora_pack.plora_core.lora_file import read_lora_file

    merged = model.clone()
    merged.add_patches(map_lora_onto_model(model, read_lora_file(str(file))).raw_patches, strength)
    return merged


def test_kohya_file_merges_like_comfyuis_own_loraloader(setup):
    model, _, _, subject_file, _ = setup
    comfy_loader = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(subject_file)), 1.0, 0)[0]
    assert torch.equal(sample(lora_loader(model, subject_file)), sample(comfy_loader))


def test_gate_changes_sampling_and_records_every_layer_and_step(setup, pack):
    model, pair, attention, subject_file, style_file = setup
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    assert patched is not model and not model.object_patches and not model.patches
    assert not pack.glue.gate.gated_layers(model) and pack.glue.gate.gated_layers(patched)
    assert "model_function_wrapper" not in model.model_options

    base = sample(model)
    subject_only = sample(lora_loader(model, subject_file))
    style_only = sample(lora_loader(model, style_file))
    direct = sample(lora_loader(lora_loader(model, subject_file), style_file))
    fused = sample(patched)
    for other in (base, subject_only, style_only, direct):
        assert not torch.allclose(fused, other, atol=1e-4)

    state = pack.glue.gate.gate_state_of(patched)
    assert state.recorder.steps() == list(range(STEPS))
    assert sorted(state.recorder.layers()) == attention  # exactly the layers both LoRAs touch
    for mask in state.recorder.decisions.values():
        assert mask.shape == (2,), "cond and uncond rows decide separately"
    decided = torch.cat([m.float() for m in state.recorder.decisions.values()])
    assert state.recorder.subject_fraction() == pytest.approx(float(decided.mean()))

    comfy.model_management.unload_all_models()
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights must be bit-identical"


def test_same_seed_gives_the_same_image_twice(setup, pack):
    model, pair, *_ = setup
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    assert torch.equal(sample(patched, seed=3), sample(patched, seed=3))


def test_decisions_are_per_sample_in_a_multi_prompt_batch(setup, pack):
    model, pair, *_ = setup
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    from support.host_support import sd15_conditioning

    sample(patched, positive=sd15_conditioning(batch=2, seed=5), negative=sd15_conditioning(batch=2, seed=6),
           latent_shape=(2, 4, 8, 8))
    masks = pack.glue.gate.gate_state_of(patched).recorder.decisions.values()
    assert all(m.shape == (4,) for m in masks)


def test_window_outside_the_run_equals_direct_merge(setup, pack):
    model, pair, _, subject_file, style_file = setup
    never = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 1.0, 1.0)[0]
    direct = sample(lora_loader(lora_loader(model, subject_file), style_file))
    assert torch.allclose(sample(never), direct, atol=1e-4)
    assert pack.glue.gate.gate_state_of(never).recorder.steps() == []


@pytest.mark.parametrize("criterion", ["js", "cosine"])
def test_other_criteria_run(setup, pack, criterion):
    model, pair, *_ = setup
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, criterion, 1.0, 0.0, 1.0)[0]
    assert torch.isfinite(sample(patched)).all()


def test_loraloader_patches_on_a_gated_layer_still_apply(setup, pack):
    model, pair, attention, *_ = setup
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    reference = sample(patched)
    key = next(f"{p}.weight" for p in attention if p.endswith("to_out.0"))
    after = patched.clone()  # a LoraLoader applied after the patcher
    after.add_patches({key: ("diff", (torch.ones_like(model.model.state_dict()[key]),))}, 1.0)
    assert not torch.allclose(sample(after), reference, atol=1e-4)
    before = model.clone()  # and one applied before it
    before.add_patches({key: ("diff", (torch.ones_like(model.model.state_dict()[key]),))}, 1.0)
    patched_before = pack.nodes.PLoRAModelPatcher().patch(before, pair, "kl", 1.0, 0.0, 1.0)[0]
    assert torch.allclose(sample(patched_before), sample(after), atol=1e-4)


def test_exception_mid_sampling_leaves_the_model_unpatched(setup, pack):
    model, pair, *_ = setup
    base = sample(model)
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]

    def interrupt(step, *args):
        if step == 1:
            raise RuntimeError("interrupted by the test")

    with pytest.raises(RuntimeError, match="interrupted by the test"):
        sample(patched, callback=interrupt)
    assert torch.equal(sample(model), base)
    comfy.model_management.unload_all_models()
    gated = [n for n, m in model.model.named_modules()
             if isinstance(m.__dict__.get("forward"), pack.plora_core.gate.GatedForward)]
    assert gated == []


def test_lowvram_offloading_gives_the_same_result(setup, pack):
    """Partially loaded (lowvram): weights cast per call and LoRA patches applied on the fly."""
    model, pair, attention, *_ = setup
    key = next(f"{p}.weight" for p in attention if p.endswith("to_out.0"))
    with_loraloader = model.clone()
    with_loraloader.add_patches({key: ("diff", (torch.randn_like(model.model.state_dict()[key]),))}, 1.0)
    patched = pack.nodes.PLoRAModelPatcher().patch(with_loraloader, pair, "kl", 1.0, 0.0, 1.0)[0]
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    context = torch.randn(2, 77, 32)

    def denoise(lowvram_bytes):
        comfy.model_management.unload_all_models()
        patched.patch_model(torch.device("cpu"), lowvram_model_memory=lowvram_bytes)
        try:
            cast_per_call.append(sum(bool(getattr(m, "comfy_cast_weights", False)) for m in patched.model.modules()))
            with torch.no_grad():
                return patched.model.apply_model(x, sigma, c_crossattn=context)
        finally:
            patched.unpatch_model(torch.device("cpu"))

    cast_per_call = []
    full, low = denoise(0), denoise(1)
    assert cast_per_call[0] == 0 and cast_per_call[1] > 10, "the second call really ran in lowvram mode"
    assert torch.allclose(full, low, atol=1e-4)
    plain = model.clone()
    plain.patch_model(torch.device("cpu"))
    try:
        with torch.no_grad():
            assert not torch.allclose(plain.model.apply_model(x, sigma, c_crossattn=context), low, atol=1e-3)
    finally:
        plain.unpatch_model(torch.device("cpu"))


def test_bfloat16_model(pack, tmp_path):
    model = tiny_sd15(dtype=torch.bfloat16)
    attention = attention_paths(model)
    subject = write_kohya_lora(tmp_path / "s.safetensors", module_shapes(model, attention))
    style = write_peft_lora(tmp_path / "t.safetensors", model, module_shapes(model, attention))
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    out = sample(patched)
    assert torch.isfinite(out).all()
    assert pack.glue.gate.gate_state_of(patched).recorder.steps() == list(range(STEPS))


def test_selection_map_node_draws_the_last_run(setup, pack):
    model, pair, attention, *_ = setup
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    node = pack.nodes.selection_map_node.PLoRASelectionMap()
    with pytest.raises(ValueError, match="recorded nothing yet"):
        node.draw(patched, {"samples": torch.zeros(1, 4, 8, 8)}, 0, "positive (cond)", 4)
    with pytest.raises(ValueError, match="no P-LoRA gate"):
        node.draw(model, {"samples": torch.zeros(1, 4, 8, 8)}, 0, "positive (cond)", 4)
    sample(patched)
    for cfg_pass in ("positive (cond)", "negative (uncond)"):
        (image,) = node.draw(patched, {"samples": torch.zeros(1, 4, 8, 8)}, 0, cfg_pass, 4)
        legend_height = pack.plora_core.selection_map.LEGEND_ROW * (2 + 2) + 4  # two LoRAs, "all", "none"
        assert image.shape[:2] == (1, len(attention) * 4 + legend_height) and image.shape[2] >= STEPS * 4
        cells = image[0, 1:len(attention) * 4:4, 1:STEPS * 4:4]
        colours = {tuple(round(v, 2) for v in px.tolist()) for px in cells.reshape(-1, 3)}
        assert colours <= {(0.96, 0.58, 0.16), (0.22, 0.47, 0.96)}, "every (step, layer) cell was decided"
        assert bool((image[0, len(attention) * 4:] > 0.99).any()), "the legend under the map (white, with text)"


def test_cancel_stops_building_the_gated_layers(setup, pack):
    """/interrupt (ComfyUI's interrupt flag) stops PLoRAModelPatcher between layers; the MODEL is untouched."""
    model, pair, *_ = setup
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not model.patches and not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "plora_gate")

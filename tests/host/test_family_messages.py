"""A LoRA whose layers do not fit gets the family message when its file says which family it is for."""

import pytest
from support.host_support import attention_paths, module_shapes, tiny_sd15, write_kohya_lora

SDXL_METADATA = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}


def wider(shapes: dict) -> dict:
    """The same layer names with other widths, as an SDXL LoRA's attention has on an SD1.5 UNet."""
    return {path: (shape[0] * 2, shape[1] * 2, *shape[2:]) for path, shape in shapes.items()}


@pytest.mark.parametrize("shared", [True, False])
def test_sdxl_lora_on_an_sd15_model_names_both_families(pack, tmp_path, shared):
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    sdxl = write_kohya_lora(tmp_path / "sdxl_style.safetensors", wider(shapes), metadata=SDXL_METADATA)
    subject = write_kohya_lora(tmp_path / "subject.safetensors", shapes if shared else
                               module_shapes(model, ["diffusion_model.input_blocks.1.1.proj_in"]))
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(sdxl), 1.0)
    with pytest.raises(ValueError, match=r"sdxl_style\.safetensors is a SDXL LoRA but the model is SD1\.5.*"
                                         r"Pick a LoRA trained for SD1\.5"):
        pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)
    assert not model.patches and not model.object_patches


def test_a_misfit_without_family_information_still_names_the_layer(pack, tmp_path):
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    odd = write_kohya_lora(tmp_path / "odd.safetensors", wider(shapes))  # no metadata: "SD1.5 or SDXL"
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(odd), 1.0, str(odd), 0.0)
    with pytest.raises(ValueError, match=r"Layer diffusion_model\..* \(LoRA .*odd\.safetensors\).*do not fit"):
        pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)
    assert not model.patches and not model.object_patches

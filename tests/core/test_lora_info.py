import json

import pytest
import torch
from safetensors.torch import save_file

from plora_core.lora_file import LoraFileError, read_header
from plora_core.lora_info import (checkpoint_family, families_compatible, lora_family, lora_rank,
                                  trigger_words)


def kohya(width: int, rank: int = 8) -> dict:
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    return {f"{key}.lora_down.weight": torch.zeros(rank, width), f"{key}.lora_up.weight": torch.zeros(640, rank)}


@pytest.mark.parametrize("width,family", [(768, "SD1.5"), (1024, "SD2"), (2048, "SDXL")])
def test_unet_family_from_the_cross_attention_width(width, family):
    assert lora_family(kohya(width), {}) == family


def test_flux_keys_and_metadata_win():
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64)}
    assert lora_family(flux, {}) == "Flux"
    assert lora_family(kohya(768), {"ss_base_model_version": "sdxl_base_v1-0"}) == "SDXL"
    assert lora_family(kohya(768), {"modelspec.architecture": "flux-1-dev/lora"}) == "Flux"


def test_rank_and_trigger_words():
    assert lora_rank(kohya(768, rank=16)) == 16
    tags = {"10_dog": {"sks dog": 40, "grass": 3, "dog": 12}}
    assert trigger_words({"ss_tag_frequency": json.dumps(tags)}, limit=2) == ["sks dog", "dog"]
    assert trigger_words({"modelspec.trigger_phrase": "wtrclr, watercolour"}) == ["wtrclr", "watercolour"]
    assert trigger_words({"ss_tag_frequency": "not json"}) == []


def test_header_gives_shapes_without_reading_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(kohya(2048), str(path), metadata={"ss_output_name": "x"})
    shapes, metadata = read_header(str(path))
    assert lora_family(shapes, metadata) == "SDXL" and metadata["ss_output_name"] == "x"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(LoraFileError, match="x.safetensors could not be read"):
        read_header(str(path))


def test_checkpoint_family_and_compatibility():
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert checkpoint_family({key: (320, 768)}) == "SD1.5"
    flux = {"double_blocks.0.img_attn.qkv.weight": (1, 1), "single_blocks.0.linear1.weight": (1, 1)}
    assert checkpoint_family(flux) == "Flux"
    assert families_compatible("SD1.5 or SDXL", "SDXL") and families_compatible("unknown", "Flux")
    assert not families_compatible("Flux", "SDXL")


def test_a_flux_lora_on_double_blocks_only_is_named_flux():
    """ai-toolkit/diffusers Flux LoRAs trained on double blocks only have no single-block key."""
    from plora_core.lora_info import family_from_keys

    flux = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 16)}
    assert family_from_keys(flux) == "Flux"
    sd35 = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 2432)}
    assert family_from_keys(sd35) == "SD3"
    kohya_flux = {"lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight": (16, 3072)}
    assert family_from_keys(kohya_flux) == "Flux"

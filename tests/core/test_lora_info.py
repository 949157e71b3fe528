import json

import pytest
import torch
from safetensors.torch import save_file

from plora_pack.plora_core.lora_file import LoraFileError, read_header
from plora_pack.plora_core.lora_info import (checkpoint_family, families_compatible, lora_family, lora_rank,
                                  trigger_words)


def kohya(width: int, rank: int = 8) -> dict:
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    return {f"{key}.lora_down.weight": torch.zeros(rank, width), f"{key}.lora_up.weight": torch.zeros(640, rank)}


@pytest.mark.parametrize("width,family", [(768, "SD1.5"), (1024, "SD2"), (2048, "SDXL")])
def test_unet_family_from_the_cross_attention_width(width, family):
    assert lora_family(kohya(width), {}) == family


def test_flux_keys_and_metadata_win():
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.single_transformer_blocks.0.norm.linear.lora_A.weight": torch.zeros(4, 64)}
    assert lora_family(flux, {}) == "Flux"  # per-block modulation: Flux.1 (Chroma has none)
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
    from plora_pack.plora_core.lora_info import family_from_keys

    flux = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 16),
            "transformer.transformer_blocks.0.norm1.linear.lora_A.weight": (16, 3072),
            "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": (16, 3072)}
    assert family_from_keys(flux) == "Flux"
    sd35 = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 2432)}
    assert family_from_keys(sd35) == "SD3.5 Large"
    onetrainer_flux = {"lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight": (16, 3072),
                       "lora_transformer_single_transformer_blocks_0_proj_mlp.lora_down.weight": (16, 3072)}
    assert family_from_keys(onetrainer_flux) == "Flux or Chroma"


# ---------------------------------------------------------------- the DiT families, at their real widths
# Each LoRA below is a header as its trainer writes it: the trainer's prefix and separator, the model's
# real layer names and widths (SD3.5 Medium 1536, Large 2432; Flux/Chroma/Qwen-Image 3072; HiDream 2560;
# Wan 1.3B 1536, 5B 3072, 14B 5120).


def peft(names: dict, prefix: str = "", rank: int = 16, suffix: str = "weight") -> dict:
    """{name: (out, in)} -> diffusers/peft keys (`lora_A.weight` [r, in], `lora_B.weight` [out, r])."""
    out = {}
    for name, (rows, width) in names.items():
        out[f"{prefix}{name}.lora_A.{suffix}"], out[f"{prefix}{name}.lora_B.{suffix}"] = (rank, width), (rows, rank)
    return out


def kohya_dit(names: dict, prefix: str = "lora_unet_", rank: int = 16) -> dict:
    """{name: (out, in)} -> kohya/musubi keys (`lora_unet_<name with _>.lora_down/up.weight`, `.alpha`)."""
    out = {}
    for name, (rows, width) in names.items():
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = (rank, width), (rows, rank)
        out[f"{key}.alpha"] = ()
    return out


def blocks(template: dict, count: int, kind: str) -> dict:
    return {f"{kind}.{i}.{name}": shape for i in range(count) for name, shape in template.items()}


FLUX_DOUBLE = {"img_attn.qkv": (9216, 3072), "img_attn.proj": (3072, 3072), "img_mlp.0": (12288, 3072),
               "txt_attn.qkv": (9216, 3072)}
FLUX_SINGLE = {"linear1": (21504, 3072), "linear2": (3072, 15360)}
QWEN_BLOCK = {"attn.to_q": (3072, 3072), "attn.add_k_proj": (3072, 3072), "attn.to_out.0": (3072, 3072),
              "img_mlp.net.0.proj": (12288, 3072), "txt_mlp.net.2": (3072, 12288)}
HIDREAM_BLOCK = {"block.attn1.to_q": (2560, 2560), "block.attn1.to_q_t": (2560, 2560),
                 "block.ff_i.shared_experts.w1": (3584, 2560), "block.ff_i.experts.0.w1": (6912, 2560)}


def wan_block(width: int, ffn: int) -> dict:
    return {"self_attn.q": (width, width), "self_attn.o": (width, width), "cross_attn.k": (width, width),
            "ffn.0": (ffn, width)}


def sd3_diffusers(width: int) -> dict:
    block = {"attn.to_q": (width, width), "attn.add_q_proj": (width, width), "ff.net.0.proj": (4 * width, width)}
    return blocks(block, 2, "transformer_blocks")


DIT_LORAS = {
    "SD3.5 Medium": [peft(sd3_diffusers(1536), "transformer."),  # diffusers' SD3 script, SimpleTuner, ai-toolkit
                     kohya_dit(blocks({"x_block.attn.qkv": (4608, 1536)}, 24, "joint_blocks")),  # sd-scripts
                     kohya_dit(sd3_diffusers(1536), "lora_transformer_")],  # OneTrainer
    "SD3.5 Large": [peft(sd3_diffusers(2432), "transformer."),
                    kohya_dit(blocks({"context_block.attn.qkv": (7296, 2432)}, 38, "joint_blocks"))],
    "Flux": [kohya_dit({**blocks(FLUX_DOUBLE | {"img_mod.lin": (18432, 3072)}, 19, "double_blocks"),
                        **blocks(FLUX_SINGLE, 38, "single_blocks")}),  # sd-scripts trains the modulation too
             peft(blocks({"attn.to_q": (3072, 3072), "norm1.linear": (18432, 3072)}, 19, "transformer_blocks"),
                  "transformer.")],  # ai-toolkit
    "Chroma": [peft({**blocks(FLUX_DOUBLE, 19, "double_blocks"),
                     "distilled_guidance_layer.layers.0.in_layer": (5120, 5120)}, "diffusion_model.")],
    "Flux or Chroma": [kohya_dit({**blocks(FLUX_DOUBLE, 19, "double_blocks"),
                                  **blocks(FLUX_SINGLE, 38, "single_blocks")}),
                       peft(blocks({"attn.to_q": (3072, 3072), "proj_mlp": (12288, 3072)}, 38,
                                   "single_transformer_blocks"), "transformer.")],
    "Flux.2": [peft(blocks({"img_attn.qkv": (18432, 6144)}, 8, "double_blocks"), "diffusion_model."),  # dev
               kohya_dit(blocks({"img_mlp.0": (18432, 3072)}, 5, "double_blocks"))],  # Klein 4B: SwiGLU 2 x 3x
    "Qwen-Image": [peft(blocks(QWEN_BLOCK, 60, "transformer_blocks"), "transformer."),  # diffusers, ai-toolkit
                   kohya_dit(blocks(QWEN_BLOCK, 60, "transformer_blocks")),  # musubi-tuner
                   peft(blocks(QWEN_BLOCK, 60, "transformer_blocks"), suffix="default.weight"),  # DiffSynth-Studio
                   peft(blocks({"attn.to_q": (3072, 3072)}, 60, "transformer_blocks"), "transformer.")],  # attention
    "HiDream": [peft(blocks(HIDREAM_BLOCK, 16, "double_stream_blocks"), "transformer."),  # SimpleTuner
                peft(blocks(HIDREAM_BLOCK, 32, "single_stream_blocks"), "diffusion_model.")],  # diffusion-pipe
    "Wan 1.3B": [kohya_dit(blocks(wan_block(1536, 8960), 30, "blocks")),  # musubi-tuner
                 peft(blocks(wan_block(1536, 8960), 30, "blocks"), "diffusion_model.")],  # diffusion-pipe, ai-toolkit
    "Wan 5B": [kohya_dit(blocks(wan_block(3072, 14336), 30, "blocks"))],
    "Wan 14B": [peft(blocks(wan_block(5120, 13824), 40, "blocks"), "diffusion_model."),
                kohya_dit(blocks(wan_block(5120, 13824), 40, "blocks"), "lora_unet__"),  # Wan-Fun
                peft(blocks({"attn1.to_q": (5120, 5120), "ffn.net.0.proj": (13824, 5120)}, 40, "blocks"),
                     "transformer.")],  # diffusers
}


@pytest.mark.parametrize("family,index", [(f, i) for f, files in DIT_LORAS.items() for i in range(len(files))])
def test_dit_lora_families_from_keys_and_widths(family, index):
    assert lora_family(DIT_LORAS[family][index], {}) == family


def test_an_attention_only_lora_of_a_3072_wide_dit_names_every_family_it_fits():
    """Flux.1, Chroma, Flux.2 Klein 4B and Qwen-Image are all 3072 wide; a LoRA on the first blocks'
    q projections alone fits each of them, so no warning would be right for any of them."""
    few = peft(blocks({"attn.to_q": (3072, 3072)}, 4, "transformer_blocks"), "transformer.")
    assert lora_family(few, {}) == "Flux or Chroma or Flux.2 or Qwen-Image"
    assert all(families_compatible(lora_family(few, {}), model) for model in ("Flux", "Chroma", "Qwen-Image"))
    assert not families_compatible(lora_family(few, {}), "Wan 14B")


@pytest.mark.parametrize("metadata,keys,family", [
    ({"modelspec.architecture": "wan2.1/lora"}, DIT_LORAS["Wan 14B"][0], "Wan 14B"),  # musubi, also for 2.2
    ({"modelspec.architecture": "wan2.1/lora"}, {}, "Wan 1.3B or Wan 5B or Wan 14B"),
    ({"ss_sd_model_name": "wan2.2_ti2v_5B_fp16.safetensors"}, {}, "Wan 5B"),
    ({"modelspec.architecture": "chroma/lora"}, DIT_LORAS["Flux or Chroma"][0], "Chroma"),  # sd-scripts
    ({"modelspec.architecture": "Flux.1-dev/lora"}, DIT_LORAS["Flux or Chroma"][0], "Flux"),  # musubi Kontext
    ({"modelspec.architecture": "Qwen-Image-Edit/lora"}, {}, "Qwen-Image"),
    ({"modelspec.architecture": "stable-diffusion-3.5-large/lora"}, {}, "SD3.5 Large"),
    ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, {}, "SD3.5 Medium"),
    ({"ss_base_model_version": "sd3"}, DIT_LORAS["SD3.5 Large"][0], "SD3.5 Large"),
    ({"ss_sd_model_name": "hidream_i1_full_fp16.safetensors"}, {}, "HiDream"),
    ({"modelspec.architecture": "flux-2-klein-4b/lora"}, {}, "Flux.2"),
])
def test_metadata_names_the_family_and_keys_narrow_it(metadata, keys, family):
    assert lora_family(keys, metadata) == family


def test_dit_checkpoint_families_in_comfyui_and_diffusers_layouts():
    assert checkpoint_family({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (7296, 2432)}) \
        == "SD3.5 Large"
    assert checkpoint_family({"joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}) == "SD3.5 Medium"
    assert checkpoint_family({"transformer_blocks.0.attn.add_q_proj.weight": (1536, 1536),
                              "transformer_blocks.0.attn.to_q.weight": (1536, 1536)}) == "SD3.5 Medium"
    flux = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.0.linear1.weight": (21504, 3072)}
    assert checkpoint_family({**flux, "distilled_guidance_layer.in_proj.weight": (5120, 64)}) == "Chroma"
    assert checkpoint_family({**flux, "double_stream_modulation_img.lin.weight": (36864, 6144)}) == "Flux.2"
    assert checkpoint_family({"txt_norm.weight": (3584,), "transformer_blocks.0.img_mlp.net.0.proj.weight":
                              (12288, 3072)}) == "Qwen-Image"
    assert checkpoint_family({"double_stream_blocks.0.block.attn1.to_q.weight": (2560, 2560)}) == "HiDream"
    for width, family in ((1536, "Wan 1.3B"), (3072, "Wan 5B"), (5120, "Wan 14B"), (2048, "Wan (width 2048)")):
        assert checkpoint_family({"blocks.0.self_attn.q.weight": (width, width), "head.modulation": (1, 2, width)}) \
            == family
    assert checkpoint_family({"blocks.0.attn1.to_q.weight": (5120, 5120)}) == "Wan 14B"  # diffusers layout


def test_sizes_of_one_architecture_do_not_mix():
    assert not families_compatible("Wan 1.3B", "Wan 14B") and not families_compatible("SD3.5 Large", "SD3.5 Medium")
    assert families_compatible("Wan 1.3B or Wan 5B or Wan 14B", "Wan 5B")
    assert not families_compatible("Flux or Chroma", "Flux.2") and not families_compatible("Chroma", "Flux")


def test_unknown_dits_and_text_encoder_only_files_stay_unknown():
    assert lora_family({"lora_unet_layers_0_attention_qkv.lora_down.weight": (16, 3840)}, {}) == "unknown"  # Z-Image
    pixart = peft(blocks({"attn1.to_q": (1152, 1152), "attn2.to_k": (1152, 4096)}, 28, "transformer_blocks"),
                  "transformer.")
    assert lora_family(pixart, {}) == "unknown"
    assert lora_family({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (8, 768)}, {}) \
        == "SD1.5 or SDXL"

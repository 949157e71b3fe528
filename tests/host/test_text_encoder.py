"""LoadSubjectStyleLoRA applies both LoRAs' text-encoder parts to a connected CLIP, as LoraLoader does."""

import comfy.lora
import comfy.sd
import comfy.supported_models
import pytest
import torch
from support.host_support import SD15_TINY_UNET, attention_paths, module_shapes, tiny_sd15, write_kohya_lora
from safetensors.torch import load_file, save_file


TINY_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 32, "layer_norm_eps": 1e-5,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "initializer_factor": 1.0,
    "initializer_range": 0.02, "attention_dropout": 0.0, "dropout": 0.0, "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A real ComfyUI CLIP object with SD1.5's tokenizer and classes and a 2-layer text model."""
    import functools
    import json

    import comfy.sd1_clip

    config = tmp_path_factory.mktemp("clip") / "tiny_clip_text.json"
    config.write_text(json.dumps(TINY_TEXT_CONFIG))
    target = comfy.supported_models.SD15(dict(SD15_TINY_UNET)).clip_target()
    text_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=str(config))
    target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=text_model)
    return comfy.sd.CLIP(target=target)


def add_text_encoder_keys(file, clip, seed):
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    state = clip.cond_stage_model.state_dict()
    chosen = sorted(k for k in key_map if k.startswith("lora_te_") and k.endswith(("mlp_fc1", "self_attn_q_proj")))[:2]
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(file))
    for key in chosen:
        out_dim, in_dim = state[key_map[key]].shape
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, in_dim, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, 4, generator=generator)
    save_file(tensors, str(file))
    return [key_map[k] for k in chosen]


def test_both_text_encoder_parts_land_on_a_clip_clone(pack, clip, tmp_path):
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    subject = write_kohya_lora(tmp_path / "subject.safetensors", shapes, seed=1)
    style = write_kohya_lora(tmp_path / "style.safetensors", shapes, seed=2)
    keys = add_text_encoder_keys(subject, clip, 3)
    assert add_text_encoder_keys(style, clip, 4) == keys
    pair, new_clip = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 0.7, str(style), 1.0, clip)
    assert new_clip is not clip and not clip.patcher.patches
    for key in keys:
        strengths = [entry[0] for entry in new_clip.patcher.patches[key]]
        assert strengths == [0.7, 1.0]
    assert len(new_clip.patcher.patches) == len(keys), "the UNet part must not reach the CLIP"


def test_without_clip_the_output_is_empty(pack, tmp_path):
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    subject = write_kohya_lora(tmp_path / "a.safetensors", shapes)
    style = write_kohya_lora(tmp_path / "b.safetensors", shapes, seed=5)
    assert pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)[1] is None

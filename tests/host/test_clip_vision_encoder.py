"""ComfyUI's own CLIP_VISION models as guidance encoders (backprop through in-place residuals)."""

import json

import comfy.clip_vision
import pytest
import torch
from support.host_support import _randomise

TINY_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
               "image_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
               "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
               "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16,
               "torch_dtype": "float32"}


@pytest.fixture
def clip_vision(tmp_path):
    config = tmp_path / "tiny_clip_vision.json"
    config.write_text(json.dumps(TINY_VISION))
    with torch.inference_mode():  # as ComfyUI's loader node runs
        model = comfy.clip_vision.ClipVisionModel(str(config))
        _randomise(model.model, 3, 0.1)
    return model


def test_clip_vision_encoder_has_gradients_and_matches_the_host_model(pack, clip_vision):
    before = {k: v.clone() for k, v in clip_vision.model.state_dict().items()}
    encoder = pack.nodes.encoder_nodes.PLoRAEncoderFromCLIPVision().wrap(clip_vision)[0]
    pixels = torch.rand(2, 3, 48, 40, requires_grad=True)
    embedding = encoder.embed(pixels)
    assert embedding.shape == (2, 16) and embedding.dtype == torch.float32
    (grad,) = torch.autograd.grad(embedding.square().sum(), pixels)
    assert grad.abs().sum() > 0
    from plora_pack.plora_core.image_preprocess import preprocess

    with torch.no_grad():
        prepared = preprocess(pixels.detach(), 32, clip_vision.image_mean, clip_vision.image_std)
        host = clip_vision.model(pixel_values=prepared, intermediate_output=-2)[2]
    assert torch.allclose(embedding.detach(), host.float(), atol=1e-3)  # host casts through its own dtype
    after = clip_vision.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

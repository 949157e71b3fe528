"""Differentiable preprocessing and the CLIP/DINO loaders, on tiny random models saved to disk."""

import json
import os
import shutil

import pytest
from support import tiny_encoders
import torch
import torch.nn.functional as F

from plora_pack.plora_core import encoders
from plora_pack.plora_core.encoders import EncoderLoadError, load_dino_encoder, load_open_clip_encoder
from plora_pack.plora_core.image_preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess, to_nchw

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_encoders")
    clip_model, clip_paths = tiny_encoders.build_tiny_clip(str(root))
    dino_v1, v1_folder = tiny_encoders.build_tiny_dino_v1(str(root / "dino_v1"))
    dino_v2, v2_folder = tiny_encoders.build_tiny_dinov2(str(root / "dinov2"))
    return {"root": root, "clip": clip_model, "clip_paths": clip_paths,
            "dino_v1": dino_v1, "v1_folder": v1_folder, "dino_v2": dino_v2, "v2_folder": v2_folder}


@pytest.fixture(autouse=True)
def fresh_cache():
    encoders.clear_encoder_cache()
    yield
    encoders.clear_encoder_cache()


def images(batch=2, height=40, width=56, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


# ---------------------------------------------------------------- preprocessing


def test_to_nchw_layouts():
    bhwc = torch.rand(2, 5, 7, 3)
    assert torch.equal(to_nchw(bhwc), bhwc.permute(0, 3, 1, 2))
    bchw = torch.rand(2, 3, 5, 7)
    assert to_nchw(bchw, layout="bchw") is bchw
    assert to_nchw(torch.rand(1, 5, 7, 1)).shape == (1, 3, 5, 7)
    rgba = torch.rand(1, 5, 7, 4)
    assert torch.equal(to_nchw(rgba), rgba[..., :3].permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="layout"):
        to_nchw(bhwc, layout="hwc")
    with pytest.raises(ValueError, match="channels"):
        to_nchw(bhwc, layout="bchw")


def test_preprocess_resizes_shorter_side_crops_centre_and_normalises():
    constant = torch.full((1, 3, 48, 80), 0.25)
    out = preprocess(constant, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (1, 3, 32, 32)
    expected = (0.25 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 5, 7], expected)
    # Already at the size: only the centre crop, columns 8..40 of 48.
    x = torch.rand(1, 3, 32, 48)
    torch.testing.assert_close(preprocess(x, 32, (0, 0, 0), (1, 1, 1)), x[..., 8:40])
    # Resize then crop, as a "resize 40, crop 32" pipeline.
    resized = F.interpolate(x, size=(40, 60), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(preprocess(x, 32, (0, 0, 0), (1, 1, 1), resize_size=40), resized[..., 4:36, 14:46])


def test_preprocess_gradient_reaches_pixels():
    x = images(height=64, width=96).requires_grad_(True)
    weights = torch.randn(1, 3, 32, 32)
    (preprocess(x, 32, OPENAI_MEAN, OPENAI_STD) * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[..., :, 20:76].abs().sum() > 0
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- open_clip


def expected_clip(model, x):
    with torch.no_grad():
        return model.encode_image(preprocess(x, 32, OPENAI_MEAN, OPENAI_STD))


@pytest.mark.parametrize("kind", ["safetensors", "pt", "torchscript"])
def test_open_clip_loader_matches_in_memory_model(tiny, kind):
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, tiny["clip_paths"][kind])
    assert (encoder.image_size, encoder.mean, encoder.std) == (32, OPENAI_MEAN, OPENAI_STD)
    assert tiny_encoders.TINY_CLIP_ARCH in encoder.name
    x = images()
    with torch.no_grad():
        got = encoder.embed(x)
    assert got.shape == (2, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected_clip(tiny["clip"], x), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training


def test_open_clip_loader_is_cached_by_path_and_mtime(tiny):
    path = tiny["clip_paths"]["safetensors"]
    first = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, path)
    assert load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, path) is first
    stat = os.stat(path)
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    assert load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, path) is not first


def test_open_clip_half_precision_returns_float32(tiny):
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, tiny["clip_paths"]["pt"], dtype=torch.bfloat16)
    x = images()
    with torch.no_grad():
        got = encoder.embed(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_clip(tiny["clip"], x), atol=0.1, rtol=0.05)


def test_open_clip_missing_file_names_path(tiny):
    missing = str(tiny["root"] / "nope.safetensors")
    with pytest.raises(ValueError, match="nope.safetensors"):
        load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, missing)


def test_open_clip_wrong_architecture_names_path(tiny):
    path = tiny["clip_paths"]["safetensors"]
    with pytest.raises(EncoderLoadError, match="tiny_clip.safetensors") as info:
        load_open_clip_encoder("ViT-B-32", path)
    assert "does not fit" in str(info.value)
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        load_open_clip_encoder("ViT-B-33-typo", path)


def test_open_clip_garbage_file_names_path(tiny):
    garbage = tiny["root"] / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, str(garbage))


# ---------------------------------------------------------------- DINO


def test_dino_v1_loader_matches_in_memory_model(tiny):
    encoder = load_dino_encoder(tiny["v1_folder"])
    assert (encoder.image_size, encoder.resize_size) == (32, 32)
    x = images()
    with torch.no_grad():
        expected = tiny["dino_v1"](pixel_values=preprocess(x, 32, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
        got = encoder.embed(x)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dinov2_loader_matches_in_memory_model(tiny):
    encoder = load_dino_encoder(tiny["v2_folder"])
    assert (encoder.image_size, encoder.resize_size) == (32, 40)
    x = images()
    with torch.no_grad():
        pixels = preprocess(x, 32, IMAGENET_MEAN, IMAGENET_STD, resize_size=40)
        expected = tiny["dino_v2"](pixel_values=pixels).pooler_output  # the layer-normed CLS token
        got = encoder.embed(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["v1_folder", "v2_folder"])
def test_dino_without_preprocessor_config_uses_imagenet_224(tiny, tmp_path, source):
    folder = tmp_path / "plain"
    shutil.copytree(tiny[source], folder)
    os.remove(folder / "preprocessor_config.json")
    encoder = load_dino_encoder(str(folder))
    assert (encoder.image_size, encoder.mean, encoder.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        assert encoder.embed(images()).shape == (2, 32)


@pytest.mark.parametrize("kind", ["clip", "dino_v1", "dinov2"])
def test_loaded_under_inference_mode_still_backpropagates(tiny, kind):
    dtype = torch.float64  # a cast: new parameter tensors are made during the load, as with a move to the GPU
    with torch.inference_mode():
        if kind == "clip":
            encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, tiny["clip_paths"]["safetensors"],
                                             dtype=dtype)
        else:
            encoder = load_dino_encoder(tiny["v1_folder" if kind == "dino_v1" else "v2_folder"], dtype=dtype)
        # What a ComfyUI node does: leave inference mode for the guided part.
        with torch.inference_mode(False), torch.enable_grad():
            x = images().requires_grad_(True)
            encoder.embed(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.model.parameters())


def test_dino_errors_name_the_folder(tiny, tmp_path):
    with pytest.raises(ValueError, match="no_such_dino"):
        load_dino_encoder(str(tmp_path / "no_such_dino"))

    not_dino = tmp_path / "clip_folder"
    not_dino.mkdir()
    (not_dino / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="clip_folder.*not a DINO"):
        load_dino_encoder(str(not_dino))

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_folder.*config.json"):
        load_dino_encoder(str(empty))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(tiny["v1_folder"], "config.json"), no_weights / "config.json")
    with pytest.raises(ValueError, match="no_weights"):
        load_dino_encoder(str(no_weights))

    wrong_size = tmp_path / "wrong_size"
    shutil.copytree(tiny["v1_folder"], wrong_size)
    config = json.loads((wrong_size / "config.json").read_text())
    config["hidden_size"] = 48
    (wrong_size / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong_size"):
        load_dino_encoder(str(wrong_size))
